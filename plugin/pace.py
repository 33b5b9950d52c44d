"""How often a fusion worker looks at its guest, and how much CPU it may spend.

A worker looks every second while a new guest's memory moves and backs off
while it holds still; a token bucket keeps its CPU within the configured
budget on average, while letting a new domain be measured at once.
"""

from __future__ import annotations

import time

BUDGET_WINDOW_S = 60.0
# Passes come every second while the guest's memory is in flux and back off
# to MAX_PASS_INTERVAL_S while it is not: the budget is a cap, and a settled
# guest needs only a look now and then to notice new fusible memory.
MIN_PASS_INTERVAL_S = 1.0
MAX_PASS_INTERVAL_S = 120.0
# A guest that settled once and moves again (a program started, KSM cleared)
# is looked at less eagerly than a guest booting.
RESETTLE_PASS_INTERVAL_S = 8.0
# A change of the fusible count by more than this share counts as flux.
SETTLED_CHANGE = 0.02


class TokenBucket:
    """CPU seconds that may be spent: refills at ``rate`` per second up to ``capacity``."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = capacity, time.monotonic()

    def spend(self, seconds: float) -> None:
        self._refill()
        self.tokens -= seconds

    def wait_s(self) -> float:
        """How long to wait until the bucket is no longer in debt."""
        self._refill()
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


def count_held(before: int | None, after: int) -> bool:
    """True if the fusible count held from one cycle to the next."""
    return before is not None and abs(after - before) <= SETTLED_CHANGE * max(before, 1)


def next_interval(
    interval_s: float, before: int | None, after: int, settled_once: bool = False
) -> float:
    """The pause after a cycle: back to the minimum when the fusible count
    moved (a longer one for a guest that settled before), twice as long (up
    to the maximum) when it held."""
    if not count_held(before, after):
        return RESETTLE_PASS_INTERVAL_S if settled_once else MIN_PASS_INTERVAL_S
    return min(MAX_PASS_INTERVAL_S, interval_s * 2)
