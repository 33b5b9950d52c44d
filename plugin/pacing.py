"""Pacing KSM by what the fusion workers found.

KSM scans every mergeable page at a fixed pace, merging a page only after
two full scans saw it unchanged. Fast scanning fuses new guests within
seconds but costs CPU for ever after; slow scanning is cheap but leaves a
late arrival unfused for minutes. The workers know how much is fusible, so
the daemon can do both:

- ``fast`` while the backlog (memory the workers call fusible that KSM has
  not fused yet) is large: a full scan of all mergeable memory four times a
  second, as fast as KSM is usually run;
- ``settling`` while a domain's worker has not measured it yet, or its
  memory still moves (a guest booting), and the backlog is small: a full
  scan every two seconds. Most of what a booting guest shares with
  running ones (kernel, libraries, page cache) is already in KSM's stable
  tree, and KSM merges a page that matches the stable tree the first time
  it scans it, without waiting for a second look; so this fuses it soon
  after its memory holds still, at an eighth of fast's cost, and whatever
  the worker then finds fusible but unfused switches to ``fast``;
- ``slow`` once the backlog is small, or once fused memory stopped growing
  for a few full scans (what is left is not reachable, e.g. pages that keep
  changing between KSM's looks): barely scanning, since any new fusible
  memory will show up in the workers' reports and switch back to ``fast``;
- ``idle`` with no page-fusion domain running: ``run=0``, merged pages kept.

Fast and settling modes also turn KSM's ``smart_scan`` off: it lets ksmd
skip pages that failed to merge before for a growing number of scans, and
was seen here to leave thousands of fusible pages unmerged for hundreds of
full scans; a booting guest's pages, which change often at first, would
be skipped the same way.
Slow mode turns it back on, where skipping is the point.

Each decision is written with its reason to ``/run/pagefusion/pacing.json``
for ``pagefusion status``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

from pagefusion import ksm, paths, runstate
from pagefusion.worker import Report, read_report

log = logging.getLogger(__name__)

FAST_FULL_SCAN_S = 0.25
FAST_SLEEP_MS = 5
SETTLING_FULL_SCAN_S = 2.0
SETTLING_SLEEP_MS = 20
SLOW_PAGES_TO_SCAN = 100
SLOW_SLEEP_MS = 500
# The backlog counts as small below this many pages, or this share of the fusible total.
BACKLOG_SMALL_PAGES = 256
BACKLOG_SMALL_SHARE = 0.05
# Fast scanning gives up when fused memory has not grown over this many full
# scans (KSM's own full_scans counter: a busy ksmd takes longer per scan than
# asked), until the workers find more fusible memory than at that point.
PLATEAU_FULL_SCANS = 3
MIN_FAST_PAGES_TO_SCAN = 1000
# A domain whose memory has not settled (a guest booting) keeps KSM fast for
# at most this long after its worker started.
SETTLING_LIMIT_S = 30.0
MAX_PAGES_TO_SCAN = 50000


@dataclass(frozen=True)
class Decision:
    mode: str
    reason: str
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    smart_scan: int
    fusible_pages: int
    fused_pages: int
    backlog_pages: int
    domains: int
    decided_at: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def full_scan_pages_to_scan(
    mergeable_pages: int, full_scan_s: float = FAST_FULL_SCAN_S, sleep_ms: int = FAST_SLEEP_MS
) -> int:
    """Pages per wake-up that scan all mergeable memory in ``full_scan_s``."""
    wakeups = full_scan_s * 1000 / sleep_ms
    wanted = math.ceil(mergeable_pages / wakeups)
    return max(MIN_FAST_PAGES_TO_SCAN, min(MAX_PAGES_TO_SCAN, wanted))


class Pacer:
    """Remembers what it saw between ticks: when fused memory last grew."""

    def __init__(self) -> None:
        self.mode = "idle"
        self.best_fused = 0
        self.best_fused_scan = 0
        self.plateau_fusible: int | None = None
        # Domains whose memory has held still once: later flux (KSM cleared,
        # a program started in the guest) is no longer a guest starting.
        self.settled_once: set[str] = set()

    def decide(self, reports: list[Report], counters: dict[str, int], domains: int) -> Decision:
        fused = ksm.fused_pages(counters)
        fusible = sum(r.cycle.get("pages_fusible", 0) for r in reports)
        backlog = max(0, fusible - fused)
        mergeable = sum(r.pages_total for r in reports)
        now = time.time()
        unmeasured = domains - sum(1 for r in reports if r.measured)
        self.settled_once &= {r.uuid for r in reports}
        self.settled_once |= {r.uuid for r in reports if r.settled}
        settling = sum(
            1
            for r in reports
            if r.measured
            and r.uuid not in self.settled_once
            and now - r.started_at < SETTLING_LIMIT_S
        )

        full_scans = counters.get("full_scans", 0)
        margin = max(BACKLOG_SMALL_PAGES, BACKLOG_SMALL_SHARE * fusible)
        if fused < self.best_fused - margin:
            # Fused memory fell (KSM was cleared, domains stopped): what was
            # learnt about the plateau no longer holds.
            self.best_fused, self.plateau_fusible = fused, None
        if fused > self.best_fused:
            self.best_fused, self.best_fused_scan = fused, full_scans
        stalled = self.mode == "fast" and full_scans - self.best_fused_scan >= PLATEAU_FULL_SCANS

        if domains == 0:
            mode, reason = "idle", "no page-fusion domain runs"
        elif backlog <= margin:
            mode, reason = "slow", f"backlog of {backlog} pages is small"
        elif self.plateau_fusible is not None and fusible <= self.plateau_fusible + margin:
            mode, reason = (
                "slow",
                (
                    f"fused memory stopped growing at {self.best_fused} pages; the {backlog}"
                    " pages left are not reachable now"
                ),
            )
        elif stalled:
            self.plateau_fusible = fusible
            mode, reason = (
                "slow",
                (
                    f"fused memory stopped growing at {fused} pages; the {backlog} pages"
                    " left are not reachable now"
                ),
            )
        else:
            mode, reason = "fast", f"backlog of {backlog} fusible pages not yet fused"
        # Nothing known to fuse, but a domain whose memory is not known or
        # not still yet: keep looking at a moderate pace.
        if mode == "slow" and unmeasured > 0:
            mode, reason = "settling", f"{unmeasured} domain(s) not measured yet by their worker"
        elif mode == "slow" and settling > 0:
            mode, reason = (
                "settling",
                f"{settling} domain(s) starting, their memory not settled yet",
            )

        if mode == "fast" and self.mode != "fast":
            # A new start: give fused memory its full scans to grow again.
            self.best_fused_scan, self.plateau_fusible = full_scans, None
        self.mode = mode
        if mode == "fast":
            run, pages, sleep = ksm.RUN_MERGE, full_scan_pages_to_scan(mergeable), FAST_SLEEP_MS
        elif mode == "settling":
            pages = full_scan_pages_to_scan(mergeable, SETTLING_FULL_SCAN_S, SETTLING_SLEEP_MS)
            run, sleep = ksm.RUN_MERGE, SETTLING_SLEEP_MS
        elif mode == "slow":
            run, pages, sleep = ksm.RUN_MERGE, SLOW_PAGES_TO_SCAN, SLOW_SLEEP_MS
        else:
            run, pages, sleep = ksm.RUN_STOP, SLOW_PAGES_TO_SCAN, SLOW_SLEEP_MS
        return Decision(
            mode=mode,
            reason=reason,
            run=run,
            pages_to_scan=pages,
            sleep_millisecs=sleep,
            smart_scan=0 if mode in ("fast", "settling") else 1,
            fusible_pages=fusible,
            fused_pages=fused,
            backlog_pages=backlog,
            domains=domains,
            decided_at=time.time(),
        )


def decision_path():
    return paths.RUN_DIR / "pacing.json"


def apply(decision: Decision, previous: Decision | None) -> None:
    """Write the decision to KSM (only what changed) and to pacing.json."""
    if previous is None or (previous.mode, previous.pages_to_scan) != (
        decision.mode,
        decision.pages_to_scan,
    ):
        log.info("KSM pacing %s: %s", decision.mode, decision.reason)
    ksm.save_host_settings()
    ksm.write_value("pages_to_scan", decision.pages_to_scan)
    ksm.write_value("sleep_millisecs", decision.sleep_millisecs)
    # Zero pages merge with the kernel's zero page, counted in ksm_zero_pages,
    # instead of crowding one KSM page's chain.
    if (ksm.SYSFS / "use_zero_pages").exists():
        ksm.write_value("use_zero_pages", 1)
    if (ksm.SYSFS / "smart_scan").exists():
        ksm.write_value("smart_scan", decision.smart_scan)
    ksm.write_value("run", decision.run)
    runstate.write_atomically(decision_path(), json.dumps(decision.as_dict(), sort_keys=True))


def read_decision() -> dict[str, object] | None:
    try:
        return json.loads(decision_path().read_text())
    except (FileNotFoundError, ValueError):
        return None


def running_page_fusion_records() -> list[runstate.DomainRecord]:
    return [
        r
        for r in runstate.all_records()
        if r.enabled and r.phase == runstate.PHASE_RUNNING and r.qemu_alive()
    ]


def _reports_stamp() -> int | None:
    """Changes whenever a worker writes its report (they are replaced, not rewritten)."""
    try:
        return paths.worker_dir().stat().st_mtime_ns
    except OSError:
        return None


class PacingTask:
    """The daemon's periodic task: read the reports, decide, apply."""

    def __init__(self) -> None:
        self.pacer = Pacer()
        self.previous: Decision | None = None
        self.reports_stamp: int | None = None

    def needs_decision(self) -> bool:
        """Between quiet decisions, a cheap look (one stat, two KSM counters): did
        a worker report since, or did fused memory fall (KSM cleared, unmerged)?"""
        previous = self.previous
        if previous is None or _reports_stamp() != self.reports_stamp:
            return True
        margin = max(BACKLOG_SMALL_PAGES, BACKLOG_SMALL_SHARE * previous.fusible_pages)
        return ksm.fused_pages() < previous.fused_pages - margin

    def __call__(self, _conn=None) -> Decision | None:
        if not ksm.available():
            return None
        self.reports_stamp = _reports_stamp()
        records = running_page_fusion_records()
        reports = [r for r in (read_report(rec.uuid) for rec in records) if r is not None]
        decision = self.pacer.decide(reports, ksm.counters(), len(records))
        apply(decision, self.previous)
        self.previous = decision
        return decision
