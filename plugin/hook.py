"""The libvirt qemu hook: argv and the domain XML in, a verdict out.

libvirtd runs ``/etc/libvirt/hooks/qemu.d/pagefusion DOMAIN OPERATION
SUB-OPERATION EXTRA`` with the domain XML on stdin and waits for it. So the
hook never calls libvirt (libvirtd is blocked on us: a call back dead-locks),
never fails ``reconnect`` (libvirtd would kill the running guest), prints to
stdout only when it rewrites the XML of ``migrate``/``restore``, and imports
little. Only ``prepare``, ``migrate`` and ``restore`` may refuse; every other
operation reports a failure as a warning and lets libvirt carry on.

Each call goes through ``handle``: in the daemon, which the hook's native
front (``native/hookfront.c``) hands the call to so that it skips Python's
start and these imports (``hookserver``), or, when the daemon cannot take
it, in a process of its own through ``main``.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from pagefusion import journal, ledger, lifecycle
from pagefusion.errors import PagefusionError

log = logging.getLogger(__name__)

# Operations that may stop libvirt by failing; the others must not.
REFUSING_OPERATIONS = frozenset({"prepare", "migrate", "restore"})

HANDLERS = {
    "prepare": lifecycle.on_prepare,
    "start": lifecycle.on_start,
    "started": lifecycle.on_started,
    "stopped": lifecycle.on_stopped,
    "release": lifecycle.on_release,
    "migrate": lifecycle.on_migrate,
    "restore": lifecycle.on_restore,
    "reconnect": lifecycle.on_reconnect,
    "attach": lifecycle.on_attach,
}


_UUID = re.compile(r"<uuid>\s*([0-9a-fA-F-]{32,36})\s*</uuid>")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str = ""


def _setup_logging() -> None:
    """Log to the system log when there is one, else to stderr (libvirtd's log)."""
    root = logging.getLogger("pagefusion")
    if root.handlers:
        return
    handler: logging.Handler
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("pagefusion-hook[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pagefusion-hook: %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if os.environ.get("PAGEFUSION_DEBUG") else logging.INFO)


def _count_refusal() -> None:
    try:
        ledger.count(ledger.REFUSED_STARTS)
    except OSError as err:
        log.warning("could not count the refusal: %s", err)


def run(argv: list[str], domain_xml: str) -> tuple[Verdict, str]:
    """Dispatch one hook call; return the verdict and what to print on stdout."""
    name, operation, sub_operation = (argv + ["", "", ""])[:3]
    handler = HANDLERS.get(operation)
    if handler is None:
        log.debug("domain %r: operation %r is not ours, passing", name, operation)
        return Verdict(True), ""

    call = lifecycle.HookCall(name, operation, sub_operation, domain_xml)
    try:
        output = handler(call) or ""
    except PagefusionError as err:
        if operation in REFUSING_OPERATIONS:
            _count_refusal()
            return Verdict(False, str(err)), ""
        log.warning("domain %r %s: %s (libvirt carries on)", name, operation, err)
        return Verdict(True, str(err)), ""
    except Exception as err:  # noqa: BLE001 - a hook must answer, never crash
        log.error("domain %r %s: internal error: %r", name, operation, err)
        log.debug("internal error in the hook", exc_info=True)
        if operation in REFUSING_OPERATIONS:
            return Verdict(False, f"internal error in pagefusion's hook: {err!r}"), ""
        return Verdict(True, f"internal error: {err!r}"), ""  # repr: one line
    return Verdict(True), output


@dataclass(frozen=True)
class Answer:
    """What the hook tells libvirtd: exit status, stdout and stderr."""

    status: int
    stdout: str = ""
    stderr: str = ""


SERVED_BY_DAEMON = "daemon"
SERVED_BY_HOOK_PROCESS = "hook process"


def handle(args: list[str], domain_xml: str, served_by: str = SERVED_BY_HOOK_PROCESS) -> Answer:
    """Run one hook call, log and journal it; the daemon serves calls through this."""
    started = time.monotonic()
    verdict, output = run(args, domain_xml)
    # libvirt puts stderr into the error that virsh shows; keep it one line.
    errors = "" if verdict.ok else f"pagefusion: {verdict.message}\n"

    elapsed_ms = (time.monotonic() - started) * 1000
    name, operation, sub_operation = (args + ["", "", ""])[:3]
    log.info(
        "domain %r %s %s: %s (%.0f ms, %s)",
        name,
        operation,
        sub_operation,
        "ok" if verdict.ok else "refused",
        elapsed_ms,
        served_by,
    )
    uuid = _UUID.search(domain_xml)
    journal.record(
        domain=name,
        uuid=uuid.group(1) if uuid else None,
        operation=operation,
        sub_operation=sub_operation,
        xml_sha256=hashlib.sha256(domain_xml.encode()).hexdigest(),
        xml_bytes=len(domain_xml.encode()),
        ok=verdict.ok,
        message=verdict.message,
        duration_ms=round(elapsed_ms, 1),
        served_by=served_by,
    )
    return Answer(0 if verdict.ok else 1, output, errors)


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    """Entry point of the hook in its own process; returns the exit status for libvirtd."""
    _setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        domain_xml = (stdin or sys.stdin).read()
    except (OSError, UnicodeDecodeError) as err:
        domain_xml = ""
        log.warning("could not read the domain XML on stdin: %s", err)
    answer = handle(args, domain_xml)
    sys.stdout.write(answer.stdout)
    sys.stderr.write(answer.stderr)
    return answer.status


if __name__ == "__main__":
    sys.exit(main())
