"""Per-backend circuit breaker.

State is derived from an injected monotonic clock when it is read (as fabfuel/circuitbreaker
does), so nothing has to run on a timer and tests drive time by hand instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed -> open after `threshold` consecutive failures; open -> half-open after
    `recovery_time` seconds; half-open lets `half_open_limit` trial requests through, and one
    success closes it while one failure opens it again."""

    __slots__ = (
        "threshold",
        "recovery_time",
        "half_open_limit",
        "failure_count",
        "last_failure_time",
        "_clock",
        "_state",
        "_opened_at",
        "_trials",
    )

    def __init__(
        self,
        threshold: int = 5,
        recovery_time: float = 60.0,
        half_open_limit: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.recovery_time = recovery_time
        self.half_open_limit = half_open_limit
        self.failure_count = 0
        self.last_failure_time: float | None = None
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._trials = 0

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.recovery_time
        ):
            self._state = BreakerState.HALF_OPEN
            self._trials = 0
        return self._state

    def allows(self) -> bool:
        """Whether a new request may be sent; cheap when closed, the common case."""
        if self._state is BreakerState.CLOSED:
            return True
        state = self.state
        return state is BreakerState.HALF_OPEN and self._trials < self.half_open_limit

    def on_dispatch(self) -> None:
        """Count a trial request while half-open."""
        if self._state is BreakerState.HALF_OPEN:
            self._trials += 1

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED or self.failure_count:
            self._state = BreakerState.CLOSED
            self.failure_count = 0
            self._trials = 0

    def record_failure(self) -> None:
        self.failure_count += 1
        self.last_failure_time = self._clock()
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.failure_count >= self.threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self.last_failure_time

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self.failure_count}>"
