"""Is this host ready for page fusion? Each check says what it found and how to fix it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import libvirt

from pagefusion import daemon, element, install, ksm, paths, runstate, services
from pagefusion.connection import open_connection
from pagefusion.errors import PagefusionError

log = logging.getLogger(__name__)

# qemu.d hook directories arrived in libvirt 6.5.
MIN_LIBVIRT_VERSION = 6_005_000


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def hook_seen_by_libvirtd() -> bool | None:
    """True if libvirtd started after the hook was last written; None if not running."""
    pid = services.libvirtd_pid()
    if pid is None:
        return None
    try:
        return services.started_after(pid, paths.hook_path().stat().st_mtime)
    except FileNotFoundError:
        return False


def check_ksm() -> Check:
    if not ksm.available():
        return Check("ksm", False, f"{ksm.SYSFS} is missing: the kernel lacks CONFIG_KSM")
    if not os.access(ksm.SYSFS / "run", os.W_OK):
        return Check("ksm", False, f"{ksm.SYSFS / 'run'} is not writable: run as root")
    return Check("ksm", True, f"KSM present, run={ksm.read_value('run')}")


def check_hook() -> Check:
    try:
        current = paths.hook_path().read_text()
    except FileNotFoundError:
        return Check("hook", False, f"{paths.hook_path()} is missing: run 'pagefusion install'")
    if current != install.hook_text():
        return Check("hook", False, f"{paths.hook_path()} is outdated: run 'pagefusion install'")
    seen = hook_seen_by_libvirtd()
    if seen is None:
        return Check("hook", False, "libvirtd is not running")
    if not seen:
        return Check(
            "hook", False, "libvirtd started before the hook was installed: restart libvirtd"
        )
    return Check("hook", True, f"{paths.hook_path()} installed and seen by libvirtd")


def check_daemon() -> Check:
    pid = daemon.daemon_pid()
    if pid is None:
        return Check(
            "daemon",
            False,
            "pagefusion's daemon is not running: changes to running domains are not undone"
            " ('pagefusion daemon')",
        )
    return Check("daemon", True, f"daemon running as pid {pid}")


def check_libvirt(conn: libvirt.virConnect) -> Check:
    version = conn.getLibVersion()
    shown = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
    if version < MIN_LIBVIRT_VERSION:
        return Check("libvirt", False, f"libvirt {shown} lacks hooks/qemu.d: 6.5.0 or newer needed")
    return Check("libvirt", True, f"libvirt {shown}")


def check_unmarked_domains(conn: libvirt.virConnect) -> Check:
    """Running domains with page fusion off whose memory KSM may merge anyway."""
    exposed = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            value = element.from_domain(element.parse_domain(dom.XMLDesc(0)))
        except PagefusionError:
            continue
        pid = runstate.qemu_pid_of(dom.name())
        stat = ksm.process_stat(pid) if pid else None
        if not value.enabled and stat is not None and stat.mergeable:
            exposed.append(dom.name())
    if exposed:
        names = ", ".join(repr(n) for n in exposed)
        return Check(
            "isolation",
            False,
            f"running with page fusion off but mergeable: {names}; run 'pagefusion set NAME"
            " off' while each is shut off, or shut it down and start it again after"
            " 'pagefusion install', so that it runs with <nosharepages/>",
        )
    return Check("isolation", True, "every running domain without page fusion is unmergeable")


def run_checks(uri: str | None = None) -> list[Check]:
    checks = [check_ksm(), check_hook(), check_daemon()]
    try:
        conn = open_connection(uri)
    except PagefusionError as err:
        return checks + [Check("libvirt", False, str(err))]
    try:
        checks += [check_libvirt(conn), check_unmarked_domains(conn)]
    finally:
        conn.close()
    return checks
