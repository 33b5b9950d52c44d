"""What pagefusion knows about each domain that libvirt runs, kept by the hook.

A record per domain lives in ``/run/pagefusion/domains/UUID.json`` from
``prepare`` until ``release``: the page-fusion value the domain was started
with, the phase it is in, and its QEMU process. The hook, the daemon and the
CLI read these records instead of asking libvirtd, which the hook must not do.
Records are written atomically (a temporary file renamed into place), so a
reader never sees half a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagefusion import paths
from pagefusion.element import PageFusion
from pagefusion.errors import HostError

log = logging.getLogger(__name__)

PHASE_PREPARED = "prepared"
PHASE_RUNNING = "running"
PHASE_STOPPED = "stopped"


@dataclass
class DomainRecord:
    name: str
    uuid: str
    enabled: bool
    group: str | None
    phase: str = PHASE_PREPARED
    qemu_pid: int | None = None
    since: float = field(default_factory=time.time)

    @property
    def page_fusion(self) -> PageFusion:
        return PageFusion(enabled=self.enabled, group=self.group)

    def qemu_alive(self) -> bool:
        """True if the recorded QEMU process still exists."""
        if self.qemu_pid is None:
            return False
        try:
            os.kill(self.qemu_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


_XML_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
_STATUS_PID = re.compile(rb"<domstatus\b[^>]*\bpid=['\"](\d+)['\"]")


def qemu_pid_of(name: str) -> int | None:
    """The pid libvirt recorded for a running domain's QEMU, or None.

    libvirt's status file carries it under the plain domain name; its pidfile
    is named after the XML-escaped name, which differs for names with quotes
    or ampersands, so it is only the fallback.
    """
    try:
        with open(paths.LIBVIRT_RUN_DIR / "qemu" / f"{name}.xml", "rb") as status:
            found = _STATUS_PID.search(status.read(4096))
        if found:
            return int(found.group(1))
    except OSError:
        pass
    escaped = "".join(_XML_ESCAPES.get(char, char) for char in name)
    for candidate in dict.fromkeys((name, escaped)):
        try:
            return int(paths.qemu_pidfile(candidate).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def records_dir() -> Path:
    return paths.domain_records()


def _path(uuid: str) -> Path:
    return records_dir() / f"{uuid}.json"


def write_atomically(path: Path, content: str | bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``content``, root-only, so that readers see the old
    or the new file. ``sync`` makes it survive a crash (not needed under /run)."""
    paths.ensure_private_dir(path.parent)
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def save(record: DomainRecord) -> None:
    write_atomically(_path(record.uuid), json.dumps(asdict(record), sort_keys=True))
    log.debug("domain %r: record saved, phase %s", record.name, record.phase)


def load(uuid: str) -> DomainRecord | None:
    try:
        data = json.loads(_path(uuid).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable record %s: %s", _path(uuid), err)
        return None
    known = DomainRecord.__dataclass_fields__
    return DomainRecord(**{key: value for key, value in data.items() if key in known})


def remove(uuid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(uuid).unlink()


def all_records() -> list[DomainRecord]:
    """Every domain record, in name order."""
    try:
        names = sorted(p.stem for p in records_dir().glob("*.json"))
    except OSError:
        return []
    found = [load(uuid) for uuid in names]
    return sorted((r for r in found if r is not None), key=lambda r: r.name)


@contextlib.contextmanager
def host_lock(timeout_s: float = 20.0) -> Iterator[None]:
    """Serialise decisions that depend on what else runs on the host.

    Two domains can be prepared at the same moment (libvirt runs their jobs
    in parallel); the group rule must see the one that won. A holder that
    hangs must not hang every later start: past ``timeout_s`` this raises
    HostError.
    """
    paths.ensure_private_dir(paths.host_lock().parent)
    fd = os.open(paths.host_lock(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HostError(
                        f"{paths.host_lock()} stayed locked for {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)
