"""KSM pacing decisions, from workers' reports and KSM's counters."""

from __future__ import annotations

import pytest

from pagefusion import ksm, pacing
from pagefusion.worker import Report


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(pacing.time, "monotonic", clock)
    return clock


def report(fusible: int, total: int = 65536, measured: bool = True) -> Report:
    return Report(
        uuid="u",
        name="vm",
        group="g",
        qemu_pid=1,
        worker_pid=2,
        pages_total=total,
        cycles=1 if measured else 0,
        cycle={"pages_fusible": fusible} if measured else {},
    )


def fused(pages: int) -> dict[str, int]:
    return {"pages_sharing": pages, "ksm_zero_pages": 0}


def test_no_domain_stops_ksm_keeping_merged_pages(clock):
    decision = pacing.Pacer().decide([], fused(500), domains=0)
    assert decision.mode == "idle" and decision.run == ksm.RUN_STOP


def test_a_domain_not_measured_yet_scans_fast(clock):
    decision = pacing.Pacer().decide([report(0, measured=False)], fused(0), domains=1)
    assert decision.mode == "fast" and decision.run == ksm.RUN_MERGE
    assert decision.smart_scan == 0


def test_a_large_backlog_scans_all_memory_about_every_second(clock):
    decision = pacing.Pacer().decide([report(40000), report(40000)], fused(1000), domains=2)
    assert decision.mode == "fast"
    assert decision.backlog_pages == 79000
    wakeups_per_s = 1000 / decision.sleep_millisecs
    full_scans_per_s = decision.pages_to_scan * wakeups_per_s / (2 * 65536)
    assert full_scans_per_s == pytest.approx(1 / pacing.FAST_FULL_SCAN_S, rel=0.01)


def test_a_small_backlog_scans_slowly(clock):
    decision = pacing.Pacer().decide([report(40000)], fused(39900), domains=1)
    assert decision.mode == "slow"
    assert (decision.pages_to_scan, decision.sleep_millisecs) == (100, 500)
    assert decision.smart_scan == 1


def test_fused_memory_that_stops_growing_ends_fast_scanning_until_more_is_found(clock):
    pacer = pacing.Pacer()
    assert pacer.decide([report(50000)], fused(30000), domains=1).mode == "fast"
    clock.now += 2
    assert pacer.decide([report(50000)], fused(43000), domains=1).mode == "fast"
    clock.now += pacing.PLATEAU_S + 0.1
    stalled = pacer.decide([report(50000)], fused(43000), domains=1)
    assert stalled.mode == "slow"
    assert "stopped growing at 43000 pages" in stalled.reason

    # It stays slow while the workers report about the same...
    clock.now += 30
    assert pacer.decide([report(50100)], fused(43000), domains=1).mode == "slow"
    # ...and scans fast again once they find clearly more.
    clock.now += 1
    assert pacer.decide([report(60000)], fused(43000), domains=1).mode == "fast"


def test_a_late_arrival_scans_fast_after_a_plateau(clock):
    pacer = pacing.Pacer()
    pacer.decide([report(50000)], fused(43000), domains=1)
    clock.now += pacing.PLATEAU_S + 0.1
    assert pacer.decide([report(50000)], fused(43000), domains=1).mode == "slow"
    late = pacer.decide([report(50000), report(0, measured=False)], fused(43000), domains=2)
    assert late.mode == "fast"
    assert "not measured yet" in late.reason
