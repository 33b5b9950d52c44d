"""Starting, finding and stopping fusion workers, one per running page-fusion domain.

The hook starts a worker at ``started`` and ``reconnect`` without waiting for
it (libvirtd waits for the hook): a transient systemd unit where systemd is
PID 1, else a detached process in its own session. A worker holds the lock
``/run/pagefusion/workers/UUID.lock`` while it runs, so a second start for
the same domain exits at once, and the lock tells who runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from pagefusion import runstate, services
from pagefusion.worker import lock_path

log = logging.getLogger(__name__)

WORKER_LOG = Path("/var/log/pagefusion/workers.log")


def worker_pid(uuid: str) -> int | None:
    """The pid of the domain's worker, or None if no worker holds its lock."""
    try:
        fd = os.open(lock_path(uuid), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode().strip()
        return int(text) if text.isdigit() else None
    else:
        return None
    finally:
        os.close(fd)


def _unit_name(uuid: str) -> str:
    return f"pagefusion-worker-{uuid}"


def launch(uuid: str) -> None:
    """Start the domain's worker in the background; never waits for it."""
    argv = [sys.executable, "-m", "pagefusion.worker", uuid]
    if services.systemd_running():
        subprocess.run(
            ["systemd-run", "--quiet", "--collect", f"--unit={_unit_name(uuid)}",
             "--property=Nice=10", "--property=CPUSchedulingPolicy=idle", *argv],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=10,
        )  # fmt: skip
        return
    services.spawn_detached(argv, WORKER_LOG)
    log.debug("worker for %s launched", uuid)


def stop(uuid: str) -> bool:
    """Ask the domain's worker to stop; True if there was one."""
    pid = worker_pid(uuid)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    log.debug("worker %d of %s asked to stop", pid, uuid)
    return True


def ensure_all() -> list[str]:
    """Start a worker for every running page-fusion domain that has none.

    The daemon calls this periodically: a worker that died (killed, crashed)
    is replaced. Returns the names of the domains given a new worker.
    """
    started = []
    for record in runstate.all_records():
        if (
            record.enabled
            and record.phase == runstate.PHASE_RUNNING
            and record.qemu_alive()
            and worker_pid(record.uuid) is None
        ):
            launch(record.uuid)
            started.append(record.name)
    if started:
        log.info("started workers for %s", ", ".join(repr(n) for n in started))
    return started
