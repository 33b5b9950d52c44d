"""The fusion worker of one running page-fusion domain.

It reads the domain's guest RAM (read-only, through the native scanner),
learns which pages KSM could fuse now, and publishes two things under
``/run/pagefusion``:

- ``workers/UUID.json``: its report, the class totals of the last complete
  cycle over the guest (fusible, volatile, zero, ...), read by the daemon to
  pace KSM and by the metrics;
- ``index/GROUP/UUID.fp``: the fingerprints of its stable pages, which the
  workers of the other domains of the same group load so that pages
  identical across domains count as fusible.

It runs niced under SCHED_IDLE within a CPU budget (a token bucket: a
minute's worth of budget may be spent at once, so a new domain is measured
quickly, and no more than the budget on average), holds a lock so that a
domain never has two workers, and exits when its QEMU process does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagefusion import config, paths, privileges, runstate, zeropages
from pagefusion.errors import DomainGoneError, PagefusionError
from pagefusion.pace import (
    BUDGET_WINDOW_S,
    MIN_PASS_INTERVAL_S,
    TokenBucket,
    count_held,
    next_interval,
)

log = logging.getLogger(__name__)

KEY_SIZE = 16
# The class totals a report carries, summed over one cycle of passes.
CYCLE_FIELDS = (
    "pages_scanned",
    "pages_zero",
    "pages_volatile",
    "pages_duplicate",
    "pages_unique",
    "pages_fusible",
    "pages_fusible_zero",
    "pages_foreign",
    "pages_unread_shared",
)


def key_path() -> Path:
    return paths.RUN_DIR / "fingerprint.key"


def load_or_create_key() -> bytes:
    """The host's fingerprint key: random, root-only, new at every boot (/run is tmpfs)."""
    path = key_path()
    paths.ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) == KEY_SIZE:
            return key
        raise PagefusionError(f"{path} holds {len(key)} bytes, not {KEY_SIZE}: remove it") from None
    key = os.urandom(KEY_SIZE)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return key


def report_path(uuid: str) -> Path:
    return paths.worker_dir() / f"{uuid}.json"


def lock_path(uuid: str) -> Path:
    return paths.worker_dir() / f"{uuid}.lock"


def index_dir(group: str) -> Path:
    return paths.RUN_DIR / "index" / group


@dataclass
class Report:
    uuid: str
    name: str
    group: str
    qemu_pid: int
    worker_pid: int
    pages_total: int = 0
    # Zero pages that only map the kernel's zero page or huge zero page: part of pages_zero,
    # never of pages_fusible.
    pages_unpopulated: int = 0
    cycles: int = 0
    # False while the fusible count still moves from one cycle to the next,
    # as it does while a guest boots.
    settled: bool = False
    started_at: float = field(default_factory=time.time)
    cycle: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    updated: float = 0.0

    @property
    def measured(self) -> bool:
        """True once a whole cycle over the guest has been counted."""
        return self.cycles > 0


def read_report(uuid: str) -> Report | None:
    try:
        data = json.loads(report_path(uuid).read_text())
    except (FileNotFoundError, ValueError):
        return None
    known = Report.__dataclass_fields__
    return Report(**{key: value for key, value in data.items() if key in known})


class Worker:
    def __init__(self, record: runstate.DomainRecord, settings: config.Config) -> None:
        self.record = record
        self.settings = settings
        self.group = record.page_fusion.effective_group
        self.foreign_mtimes: dict[str, float] = {}
        self.published_fingerprints: bytes | None = None

    def _load_foreign(self, scanner) -> None:
        """Load the published sets of the other running domains of our group."""
        seen: set[int] = set()
        try:
            published = list(index_dir(self.group).glob("*.fp"))
        except OSError:
            published = []
        for path in published:
            uuid = path.stem
            if uuid == self.record.uuid:
                continue
            other = runstate.load(uuid)
            if other is None or not other.qemu_alive():
                continue
            seen.add(other.qemu_pid)
            try:
                mtime = path.stat().st_mtime
                if self.foreign_mtimes.get(uuid) == mtime:
                    continue
                scanner.load_foreign(other.qemu_pid, path.read_bytes())
            except (OSError, PagefusionError) as err:
                log.debug("domain %r: skipping the set of %s: %s", self.record.name, uuid, err)
                continue
            self.foreign_mtimes[uuid] = mtime
        for pid in scanner.foreign_pids():
            if pid not in seen:
                scanner.drop_foreign(pid)

    def _publish(self, scanner, report: Report) -> None:
        # Under /run (tmpfs): nothing to gain from fsync.
        runstate.write_atomically(
            report_path(self.record.uuid), json.dumps(asdict(report)), sync=False
        )
        fingerprints = scanner.fingerprints()
        published = index_dir(self.group) / f"{self.record.uuid}.fp"
        if fingerprints == self.published_fingerprints and published.exists():
            # Unchanged: rewriting it would make every other worker load it again.
            return
        runstate.write_atomically(published, fingerprints, sync=False)
        self.published_fingerprints = fingerprints

    def run(self, qemu_pidfd: int) -> None:
        from pagefusion import scanner as native

        key = load_or_create_key()
        paths.ensure_private_dir(index_dir(self.group).parent)
        budget = self.settings.worker_cpu_budget
        bucket = TokenBucket(rate=budget, capacity=budget * BUDGET_WINDOW_S)
        report = Report(
            uuid=self.record.uuid,
            name=self.record.name,
            group=self.group,
            qemu_pid=self.record.qemu_pid,
            worker_pid=os.getpid(),
        )
        cycle = dict.fromkeys(CYCLE_FIELDS, 0)
        passes = 0
        interval_s = MIN_PASS_INTERVAL_S
        settled_once = False
        fusible_before: int | None = None
        pages_per_pass = self.settings.worker_pages_per_pass

        with native.PageScanner(self.record.qemu_pid, key, pages_per_pass=pages_per_pass) as pages:
            while True:
                self._load_foreign(pages)
                started = time.process_time()
                counters = pages.scan_pass()
                spent = time.process_time() - started
                bucket.spend(spent)
                report.cpu_seconds += spent

                for name in CYCLE_FIELDS:
                    cycle[name] += getattr(counters, name)
                passes += 1
                if passes >= counters.passes_per_cycle:
                    # Whether the guest holds still is judged on what its pages
                    # hold, before zero-page mappings are taken out: those come
                    # and go with KSM (merged zero pages map the zero page, an
                    # unmerge gives them private copies) while the guest is still.
                    held = count_held(fusible_before, cycle["pages_fusible"])
                    interval_s = next_interval(
                        interval_s, fusible_before, cycle["pages_fusible"], settled_once
                    )
                    fusible_before = cycle["pages_fusible"]
                    report.settled = held
                    settled_once = settled_once or held

                    unpopulated = zeropages.count_mappings(self.record.qemu_pid, pages.regions)
                    cycle["pages_fusible"] -= min(unpopulated, cycle["pages_fusible_zero"])
                    cycle["pages_fusible_zero"] -= min(unpopulated, cycle["pages_fusible_zero"])
                    report.cycle, report.cycles = dict(cycle), report.cycles + 1
                    report.pages_total = counters.pages_total
                    report.pages_unpopulated = unpopulated
                    cycle, passes = dict.fromkeys(CYCLE_FIELDS, 0), 0
                report.updated = time.time()
                self._publish(pages, report)

                pause = max(interval_s, bucket.wait_s())
                # Sleep on the QEMU process: wake at once when it exits.
                if select.select([qemu_pidfd], [], [], pause)[0]:
                    log.info("domain %r: QEMU exited, worker done", self.record.name)
                    return


def _hold_lock(uuid: str) -> int | None:
    """Take the domain's worker lock; None if another worker holds it."""
    paths.ensure_private_dir(paths.worker_dir())
    fd = os.open(lock_path(uuid), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _clean_up(uuid: str, group: str) -> None:
    for path in (report_path(uuid), index_dir(group) / f"{uuid}.fp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(10)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _stop_asked(*_) -> None:
    log.info("asked to stop")
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    """``python -m pagefusion.worker UUID``: run the worker of one domain."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("PAGEFUSION_DEBUG") else logging.INFO,
        format="%(asctime)s pagefusion-worker[%(process)d] "
        + f"{args[0] if args else '?'}: %(message)s",
    )
    if len(args) != 1:
        print("usage: python -m pagefusion.worker UUID", file=sys.stderr)
        return 2
    uuid = args[0]
    record = runstate.load(uuid)
    if record is None or not record.qemu_alive():
        log.info("domain %s is not running, no worker needed", uuid)
        return 0

    lock = _hold_lock(uuid)
    if lock is None:
        log.info("domain %r already has a worker", record.name)
        return 0
    _lower_priority()
    try:
        privileges.keep_only()
    except PagefusionError as err:
        log.warning("domain %r: worker keeps its privileges: %s", record.name, err)
    worker = Worker(record, config.load())
    # SystemExit unwinds through the finally below, which removes what we published.
    signal.signal(signal.SIGTERM, _stop_asked)
    try:
        pidfd = os.pidfd_open(record.qemu_pid)
    except ProcessLookupError:
        return 0
    log.info("domain %r: worker started for QEMU pid %d", record.name, record.qemu_pid)
    try:
        worker.run(pidfd)
    except DomainGoneError:
        log.info("domain %r: QEMU went away, worker done", record.name)
    except PagefusionError as err:
        log.warning("domain %r: worker stopped: %s", record.name, err)
        return 1
    finally:
        os.close(pidfd)
        _clean_up(uuid, worker.group)
        with contextlib.suppress(FileNotFoundError):
            lock_path(uuid).unlink()
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
