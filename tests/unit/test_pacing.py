"""KSM pacing decisions, from workers' reports and KSM's counters."""

from __future__ import annotations

import pytest

from pagefusion import ksm, pace, pacing
from pagefusion.worker import Report


def report(fusible: int, total: int = 65536, measured: bool = True, settled: bool = True) -> Report:
    return Report(
        uuid="u",
        name="vm",
        group="g",
        qemu_pid=1,
        worker_pid=2,
        pages_total=total,
        cycles=1 if measured else 0,
        settled=settled,
        cycle={"pages_fusible": fusible} if measured else {},
    )


def fused(pages: int, full_scans: int = 0) -> dict[str, int]:
    return {"pages_sharing": pages, "ksm_zero_pages": 0, "full_scans": full_scans}


def test_no_domain_stops_ksm_keeping_merged_pages():
    decision = pacing.Pacer().decide([], fused(500), domains=0)
    assert decision.mode == "idle" and decision.run == ksm.RUN_STOP


def test_a_domain_not_measured_yet_scans_all_memory_once_a_second():
    decision = pacing.Pacer().decide([report(0, measured=False)], fused(0), domains=1)
    assert decision.mode == "settling" and decision.run == ksm.RUN_MERGE
    assert "not measured yet" in decision.reason
    assert decision.smart_scan == 0


def test_a_booting_domain_keeps_ksm_looking_for_a_while():
    booting = [report(100, total=2 * 65536, settled=False)]
    decision = pacing.Pacer().decide(booting, fused(100), domains=1)
    assert decision.mode == "settling" and "not settled" in decision.reason
    wakeups_per_s = 1000 / decision.sleep_millisecs
    full_scans_per_s = decision.pages_to_scan * wakeups_per_s / (2 * 65536)
    assert full_scans_per_s == pytest.approx(1 / pacing.SETTLING_FULL_SCAN_S, rel=0.01)

    old = report(100, settled=False)
    old.started_at -= pacing.SETTLING_LIMIT_S + 1
    assert pacing.Pacer().decide([old], fused(100), domains=1).mode == "slow"


def test_a_booting_domain_with_a_backlog_scans_fast():
    decision = pacing.Pacer().decide([report(30000, settled=False)], fused(100), domains=1)
    assert decision.mode == "fast"


def test_a_large_backlog_scans_all_memory_several_times_a_second():
    decision = pacing.Pacer().decide([report(40000), report(40000)], fused(1000), domains=2)
    assert decision.mode == "fast"
    assert decision.backlog_pages == 79000
    wakeups_per_s = 1000 / decision.sleep_millisecs
    full_scans_per_s = decision.pages_to_scan * wakeups_per_s / (2 * 65536)
    assert full_scans_per_s == pytest.approx(1 / pacing.FAST_FULL_SCAN_S, rel=0.01)


def test_a_small_backlog_scans_slowly():
    decision = pacing.Pacer().decide([report(40000)], fused(39900), domains=1)
    assert decision.mode == "slow"
    assert (decision.pages_to_scan, decision.sleep_millisecs) == (100, 500)
    assert decision.smart_scan == 1


def test_fused_memory_that_stops_growing_ends_fast_scanning_until_more_is_found():
    pacer = pacing.Pacer()
    assert pacer.decide([report(50000)], fused(30000, 10), domains=1).mode == "fast"
    assert pacer.decide([report(50000)], fused(43000, 12), domains=1).mode == "fast"
    # A busy ksmd: time passes, but fewer full scans than the plateau needs.
    assert pacer.decide([report(50000)], fused(43000, 14), domains=1).mode == "fast"
    stalled = pacer.decide([report(50000)], fused(43000, 15), domains=1)
    assert stalled.mode == "slow"
    assert "stopped growing at 43000 pages" in stalled.reason

    # It stays slow while the workers report about the same...
    assert pacer.decide([report(50100)], fused(43000, 16), domains=1).mode == "slow"
    # ...and scans fast again once they find clearly more.
    assert pacer.decide([report(60000)], fused(43000, 17), domains=1).mode == "fast"


def test_a_late_arrival_is_looked_for_after_a_plateau_and_fused_fast_once_measured():
    pacer = pacing.Pacer()
    pacer.decide([report(50000)], fused(43000, 1), domains=1)
    assert pacer.decide([report(50000)], fused(43000, 5), domains=1).mode == "slow"
    late = pacer.decide([report(50000), report(0, measured=False)], fused(43000, 5), domains=2)
    assert late.mode == "settling"
    assert "not measured yet" in late.reason
    # Its worker finds 20000 fusible pages that KSM has not fused yet.
    measured = pacer.decide([report(50000), report(20000)], fused(43000, 6), domains=2)
    assert measured.mode == "fast"


def test_a_worker_looks_less_often_while_the_guest_is_settled():
    interval = pace.next_interval(pace.MIN_PASS_INTERVAL_S, None, 1000)
    assert interval == pace.MIN_PASS_INTERVAL_S
    for _ in range(10):
        interval = pace.next_interval(interval, 1000, 1005)
    assert interval == pace.MAX_PASS_INTERVAL_S
    assert pace.next_interval(interval, 1000, 1500) == pace.MIN_PASS_INTERVAL_S


def test_a_domain_that_settled_once_is_not_starting_when_its_memory_moves_again():
    pacer = pacing.Pacer()
    assert pacer.decide([report(100, settled=True)], fused(100), domains=1).mode == "slow"
    # KSM cleared or a program started in the guest: its worker sees flux again.
    moving = pacer.decide([report(100, settled=False)], fused(100), domains=1)
    assert moving.mode == "slow"


def test_between_quiet_decisions_a_report_or_falling_fused_memory_asks_for_one(monkeypatch):
    task = pacing.PacingTask()
    assert task.needs_decision()  # nothing decided yet
    task.previous = pacing.Pacer().decide([report(50000)], fused(49000), domains=1)
    stamp, fused_now = [7], [49000]
    monkeypatch.setattr(pacing, "_reports_stamp", lambda: stamp[0])
    monkeypatch.setattr(pacing.ksm, "fused_pages", lambda values=None: fused_now[0])
    task.reports_stamp = 7

    assert not task.needs_decision()
    fused_now[0] = 48900  # a little churn
    assert not task.needs_decision()
    fused_now[0] = 0  # KSM was cleared
    assert task.needs_decision()
    fused_now[0], stamp[0] = 49000, 8  # a worker wrote a new report
    assert task.needs_decision()
