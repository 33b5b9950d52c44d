"""Starting and restarting libvirt's daemons, with or without systemd.

libvirtd reads its hook directory only when it starts, so installing the hook
means restarting it. Where systemd is PID 1 that is ``systemctl``. Elsewhere
(containers, minimal hosts) pagefusion starts ``virtlogd`` and ``libvirtd``
itself, libvirtd under ``tini -s`` so that exited QEMU processes are reaped
promptly instead of lingering as zombies that libvirtd waits on.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pagefusion.errors import HostError

log = logging.getLogger(__name__)

LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
LIBVIRTD_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd-pagefusion.log")
START_TIMEOUT_S = 60.0


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _pid_from(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def process_start_time(pid: int) -> float:
    """When a process started, in seconds since the epoch, to within one clock tick.

    /proc gives the start in clock ticks since boot. /proc/stat's ``btime``
    is whole seconds, which would put the start up to a second early; the
    boot moment is taken from the clocks instead.
    """
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    booted_at = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return booted_at + int(after_name[19]) / os.sysconf("SC_CLK_TCK")


def started_after(pid: int, moment: float) -> bool:
    """True if process ``pid`` started after ``moment`` (seconds since the epoch).

    The start is rounded down to a clock tick, so a start less than a tick
    after ``moment`` still counts.
    """
    return process_start_time(pid) + 1 / os.sysconf("SC_CLK_TCK") >= moment


def libvirtd_pid() -> int | None:
    return _pid_from(LIBVIRTD_PIDFILE)


def _socket_answers() -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(LIBVIRTD_SOCKET))
        except OSError:
            return False
    return True


def fix_kvm_device() -> None:
    # Without udev /dev/kvm stays root:root 0600: libvirt's probe sees KVM but
    # QEMU, run as libvirt-qemu, cannot open it, and libvirtd then re-probes
    # QEMU on every call. Give it the ownership udev would.
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    if kvm.stat().st_gid != gid or kvm.stat().st_mode & 0o060 != 0o060:
        os.chown(kvm, -1, gid)
        kvm.chmod(0o660)
        log.info("gave /dev/kvm to group kvm, mode 0660")


def spawn_detached(argv: list[str], log_path: Path = LIBVIRTD_LOG) -> None:
    """Start a process in its own session, output appended to ``log_path``; no wait."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    # A long-lived parent (the daemon starts workers for the hook calls it
    # serves) must reap the child when it exits, or it lingers as a zombie.
    # A short-lived one exits first and leaves the child to its reaper.
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()


def _wait_for(check, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise HostError(f"{what} did not happen within {timeout_s:.0f} s; see {LIBVIRTD_LOG}")


def start_libvirt() -> None:
    """Make sure virtlogd and libvirtd run and libvirtd answers on its socket."""
    if systemd_running():
        subprocess.run(["systemctl", "start", "virtlogd", "libvirtd"], check=True)
        _wait_for(_socket_answers, "libvirtd answering on its socket")
        return

    fix_kvm_device()
    if _pid_from(VIRTLOGD_PIDFILE) is None:
        subprocess.run(["virtlogd", "-d"], check=True)
        log.info("started virtlogd")
    if libvirtd_pid() is None or not _socket_answers():
        tini = shutil.which("tini")
        argv = [tini, "-s", "--", "libvirtd"] if tini else ["libvirtd"]
        if not tini:
            log.warning("tini not found: exited QEMU processes may linger as zombies")
        spawn_detached(argv)
        _wait_for(lambda: libvirtd_pid() is not None and _socket_answers(), "libvirtd start")
        log.info("started libvirtd (pid %s)", libvirtd_pid())


def stop_libvirtd() -> None:
    """Stop libvirtd; running guests keep running and are reconnected on start."""
    if systemd_running():
        subprocess.run(["systemctl", "stop", "libvirtd"], check=True)
        return
    pid = libvirtd_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: libvirtd_pid() is None, f"libvirtd (pid {pid}) exit", 30.0)
    log.info("stopped libvirtd (pid %s)", pid)


def restart_libvirtd() -> None:
    """Restart libvirtd so that it reads its hook directory again."""
    if systemd_running():
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
        _wait_for(_socket_answers, "libvirtd answering on its socket")
        return
    stop_libvirtd()
    start_libvirt()


DAEMON_LOG = Path("/var/log/pagefusion/daemon.log")
DAEMON_UNIT = "pagefusion.service"


def start_daemon() -> None:
    """Start pagefusion's daemon if it is not running: its unit under systemd,
    else a detached process logging to DAEMON_LOG."""
    from pagefusion.daemon import daemon_pid

    if daemon_pid() is not None:
        return
    if systemd_running() and Path(f"/etc/systemd/system/{DAEMON_UNIT}").exists():
        subprocess.run(["systemctl", "start", DAEMON_UNIT], check=True)
    else:
        spawn_detached([sys.executable, "-m", "pagefusion.cli", "daemon"], DAEMON_LOG)
    from pagefusion.hookserver import socket_path

    # Up means serving hook calls: the socket comes right after the pidfile.
    _wait_for(
        lambda: daemon_pid() is not None and socket_path().exists(),
        "pagefusion daemon start",
        30.0,
    )
    log.info("started pagefusion's daemon (pid %s)", daemon_pid())


def stop_daemon() -> None:
    """Stop pagefusion's daemon if it runs (the workers keep running)."""
    from pagefusion.daemon import daemon_pid

    pid = daemon_pid()
    if pid is None:
        return
    if systemd_running() and Path(f"/etc/systemd/system/{DAEMON_UNIT}").exists():
        subprocess.run(["systemctl", "stop", DAEMON_UNIT], check=True)
    else:
        os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: daemon_pid() is None, f"pagefusion daemon (pid {pid}) exit", 30.0)
