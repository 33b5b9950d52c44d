"""The worker's CPU budget and pass interval, on a clock the test moves."""

from __future__ import annotations

import pytest

from pagefusion import pace


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(pace.time, "monotonic", fake)
    return fake


def test_a_full_bucket_lets_a_new_domain_be_measured_at_once(clock):
    # 2% of a core, a minute's worth (1.2 CPU seconds) may be spent at once.
    bucket = pace.TokenBucket(rate=0.02, capacity=0.02 * pace.BUDGET_WINDOW_S)
    bucket.spend(1.0)
    assert bucket.wait_s() == 0.0


def test_overspending_waits_until_the_debt_is_paid_at_the_budgets_rate(clock):
    bucket = pace.TokenBucket(rate=0.02, capacity=1.2)
    bucket.spend(1.2 + 0.5)
    assert bucket.wait_s() == pytest.approx(0.5 / 0.02)

    clock.now += 10.0
    assert bucket.wait_s() == pytest.approx((0.5 - 0.2) / 0.02)
    clock.now += 15.0
    assert bucket.wait_s() == 0.0


def test_average_spending_stays_within_the_budget_over_a_long_run(clock):
    # A worker whose passes cost 0.3 CPU seconds and that would look every
    # second: the bucket holds it to 2% of a core, plus the one-off capacity.
    rate, capacity, pass_cpu_s = 0.02, 1.2, 0.3
    bucket = pace.TokenBucket(rate=rate, capacity=capacity)
    began, spent = clock.now, 0.0
    while clock.now - began < 3600:
        bucket.spend(pass_cpu_s)
        spent += pass_cpu_s
        clock.now += max(pace.MIN_PASS_INTERVAL_S, bucket.wait_s())
    elapsed = clock.now - began
    assert spent <= rate * elapsed + capacity + pass_cpu_s
    assert spent >= rate * elapsed * 0.9  # and it does get its budget


def test_the_bucket_never_saves_more_than_its_capacity(clock):
    bucket = pace.TokenBucket(rate=0.02, capacity=1.2)
    clock.now += 86400
    bucket.spend(1.2)
    assert bucket.wait_s() == 0.0
    bucket.spend(0.02)
    assert bucket.wait_s() == pytest.approx(1.0)


def test_a_guest_that_settled_once_is_looked_at_less_eagerly_when_it_moves_again():
    assert pace.next_interval(120.0, 1000, 5000) == pace.MIN_PASS_INTERVAL_S
    resettling = pace.next_interval(120.0, 1000, 5000, settled_once=True)
    assert resettling == pace.RESETTLE_PASS_INTERVAL_S > pace.MIN_PASS_INTERVAL_S
    assert pace.count_held(1000, 1010) and not pace.count_held(None, 1000)
