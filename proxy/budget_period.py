"""Budget periods (`budget.period`): the spend the budget counts starts again at each UTC day
or month, or never (`none`, a lifetime total).

Every process and host derives the same period key from the wall clock, so what they
exchange about spend (cluster.worker_share, cluster.redis_sync) is labelled with it and only
the current period's figures are added up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

PERIODS = ("none", "daily", "monthly")
LIFETIME = 0  # the key of `none`


def period_bounds(period: str, now: float) -> tuple[int, float, float]:
    """(key, start, end) of the period holding `now` (epoch seconds, UTC): the key is
    20261130 for a day, 202611 for a month, 0 for `none`."""
    if period == "none":
        return LIFETIME, 0.0, float("inf")
    moment = datetime.fromtimestamp(now, UTC)
    if period == "daily":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        key = start.year * 10000 + start.month * 100 + start.day
        following = datetime.fromtimestamp(start.timestamp() + 86400 + 3600, UTC)
        end = following.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        key = start.year * 100 + start.month
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    return key, start.timestamp(), end.timestamp()


class SpendPeriod:
    """The current period and what this process had spent when it began (`base`): the
    process's spend in the period is its running total minus the base."""

    __slots__ = ("period", "key", "start", "end", "base", "_wall")

    def __init__(self, period: str, wall: Callable[[], float] = time.time) -> None:
        self.period = period
        self._wall = wall
        self.key, self.start, self.end = period_bounds(period, wall())
        self.base = 0.0

    def current(self, running_total: float) -> bool:
        """Move to the period holding now if the last one has ended (its base becomes the
        running total); True when it moved. One clock read in the common case."""
        now = self._wall()
        if now < self.end:
            return False
        self.key, self.start, self.end = period_bounds(self.period, now)
        self.base = running_total
        return True

    def reconfigured(self, period: str) -> SpendPeriod:
        """After a reload: this one when the period kind is unchanged, else a fresh one."""
        if period == self.period:
            return self
        fresh = SpendPeriod(period, self._wall)
        fresh.base = self.base
        return fresh
