"""Installing pagefusion on a host: the hook, KSM's saved settings, and isolation.

The hook is the script in ``hooks/qemu`` with the paths of this package's
interpreter and of the hook's native front filled in. libvirtd finds hooks only when it starts,
so the caller restarts it (``pagefusion install --restart-libvirtd``).
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from pagefusion import domainxml, element, ksm, paths, runstate, services, supervision
from pagefusion.connection import open_connection

log = logging.getLogger(__name__)

# The executable setup.py builds from native/hookfront.c into the package.
HOOK_FRONT_NAME = "hookfront"


def default_interpreter() -> str:
    """This environment's python3, named the same however Python was started."""
    candidate = os.path.join(sys.prefix, "bin", "python3")
    return candidate if os.path.exists(candidate) else sys.executable


def hook_front() -> Path:
    """The hook's native front, built with the package (``native/hookfront.c``)."""
    return Path(__file__).resolve().parent / HOOK_FRONT_NAME


def hook_text(interpreter: str | None = None) -> str:
    """The hook script as installed: the shipped script with our interpreter and front."""
    source = importlib.resources.files("pagefusion.hooks").joinpath("qemu").read_text()
    return source.replace("@PYTHON@", shlex.quote(interpreter or default_interpreter())).replace(
        "@FRONT@", shlex.quote(str(hook_front()))
    )


def install_hook() -> bool:
    """Write the hook if it differs from what is installed; True if it changed."""
    text = hook_text()
    try:
        if paths.hook_path().read_text() == text:
            return False
    except FileNotFoundError:
        pass
    paths.hook_dir().mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = paths.hook_path().with_name(".pagefusion.tmp")
    temporary.write_text(text)
    temporary.chmod(0o755)
    os.replace(temporary, paths.hook_path())
    log.info("installed the hook %s", paths.hook_path())
    return True


def remove_hook() -> bool:
    try:
        paths.hook_path().unlink()
    except FileNotFoundError:
        return False
    log.info("removed the hook %s", paths.hook_path())
    return True


@dataclass
class IsolationReport:
    """What an install did; ``isolated`` and ``mergeable_until_restart`` name domains."""

    isolated: list[str] = field(default_factory=list)
    mergeable_until_restart: list[str] = field(default_factory=list)
    hook_changed: bool = False
    libvirtd_restarted: bool = False
    daemon_started: bool = False
    daemon_restarted: bool = False


def isolate_existing_domains(conn: libvirt.virConnect) -> IsolationReport:
    """Give every persistent domain without page fusion ``<nosharepages/>``.

    QEMU lets KSM merge a domain's memory unless told otherwise, so without
    this a host's existing domains would be fused although nobody opted in.
    Running domains get it in their persistent definition; they stay
    mergeable until their next start, and the report says so.
    """
    report = IsolationReport()
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT):
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        domain = element.parse_domain(dom.XMLDesc(flags))
        if element.from_domain(domain).enabled or domainxml.merging_disabled(domain):
            continue
        domainxml.set_merging(domain, enabled=False)
        conn.defineXML(domainxml.to_string(domain))
        report.isolated.append(dom.name())
        if dom.isActive():
            report.mergeable_until_restart.append(dom.name())
        log.info("domain %r: merging turned off (page fusion is off)", dom.name())
    return report


def install(
    *, uri: str | None = None, restart_libvirtd: bool = False, start_daemon: bool = False
) -> IsolationReport:
    from pagefusion.daemon import daemon_pid

    changed = install_hook()
    ksm.save_host_settings()
    paths.ensure_private_dir(paths.STATE_DIR)
    paths.ensure_private_dir(paths.RUN_DIR)
    restarted = restart_libvirtd and (changed or services.libvirtd_pid() is None)
    if restarted:
        services.restart_libvirtd()
    report = isolate_existing_domains(open_connection(uri))
    report.hook_changed, report.libvirtd_restarted = changed, restarted
    if start_daemon:
        pid = daemon_pid()
        if pid is not None and not services.started_after(pid, package_installed_at()):
            # The daemon serves the hook's calls with the code it loaded at
            # its start: after an upgrade it must load the new code.
            services.stop_daemon()
            report.daemon_restarted = True
            pid = None
        if pid is None:
            services.start_daemon()
            report.daemon_started = not report.daemon_restarted
    return report


def package_installed_at() -> float:
    """When this package's files were last written (installed or upgraded)."""
    package = Path(__file__).resolve().parent
    return max(
        path.stat().st_mtime for path in (*package.glob("*.py"), hook_front()) if path.exists()
    )


def uninstall() -> dict[str, int | str]:
    """Stop the daemon and the workers, remove the hook and put back the
    host's KSM settings; return those.

    The daemon goes first: while it runs it paces KSM and would write over
    the settings put back.
    """
    services.stop_daemon()
    for record in runstate.all_records():
        supervision.stop(record.uuid)
    remove_hook()
    return ksm.restore_host_settings()
