"""Per-backend circuit breaker.

State is derived from an injected monotonic clock when it is read (as fabfuel/circuitbreaker
does), so nothing has to run on a timer and tests drive time by hand instead of sleeping.

Besides consecutive failures, the breaker can open on slowness (adaptive mode): more than
`slow_request_limit` requests slower than `latency_threshold` within `slow_window` seconds, so
that a backend that is degrading stops getting traffic before it starts failing outright.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum

from circuit.snapshot import BreakerSnapshot


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def iso_utc(timestamp: float | None) -> str | None:
    """A wall-clock time (seconds since the epoch) as ISO-8601 UTC, the one form reports use."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class CircuitBreaker:
    """closed -> open after `threshold` consecutive failures (or too many slow requests);
    open -> half-open after the recovery time; half-open lets `half_open_limit` trial requests
    through, and a success closes it while a failure opens it again for twice as long as last
    time, up to `max_recovery_time`."""

    __slots__ = (
        "threshold",
        "recovery_time",
        "max_recovery_time",
        "half_open_limit",
        "latency_threshold",
        "slow_request_limit",
        "slow_window",
        "failure_count",
        "last_failure_time",
        "trips",
        "on_change",
        "_clock",
        "_wall_clock",
        "_state",
        "_opened_at",
        "_open_for",
        "_trials",
        "_slow",
    )

    def __init__(
        self,
        threshold: int = 5,
        recovery_time: float = 60.0,
        half_open_limit: int = 3,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_recovery_time: float | None = None,
        latency_threshold: float | None = None,
        slow_request_limit: int = 3,
        slow_window: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (monotonic) drives the state; `wall_clock` only dates what `snapshot`
        reports, so both can be fixed in tests."""
        self.threshold = threshold
        self.recovery_time = recovery_time
        self.max_recovery_time = (
            max_recovery_time if max_recovery_time is not None else recovery_time * 8
        )
        self.half_open_limit = half_open_limit
        self.latency_threshold = latency_threshold  # None: adaptive mode off
        self.slow_request_limit = slow_request_limit
        self.slow_window = slow_window
        self.failure_count = 0
        self.last_failure_time: float | None = None
        self.trips = 0
        self.on_change: Callable[[CircuitBreaker, BreakerState], None] | None = None
        self._clock = clock
        self._wall_clock = wall_clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._open_for = recovery_time
        self._trials = 0
        self._slow: deque[float] = deque()

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for:
            self._set(BreakerState.HALF_OPEN)
            self._trials = 0
        return self._state

    @property
    def slow_requests(self) -> int:
        self._forget_old_slow(self._clock())
        return len(self._slow)

    @property
    def open_for(self) -> float:
        """How long the current (or last) open period lasts."""
        return self._open_for

    def allows(self) -> bool:
        """Whether a new request may be sent; cheap when closed, the common case."""
        if self._state is BreakerState.CLOSED:
            return True
        return self.state is BreakerState.HALF_OPEN and self._trials < self.half_open_limit

    def is_open(self) -> bool:
        return self._state is not BreakerState.CLOSED and self.state is BreakerState.OPEN

    def on_dispatch(self) -> None:
        """Count a trial request while half-open."""
        if self._state is not BreakerState.CLOSED and self.state is BreakerState.HALF_OPEN:
            self._trials += 1

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)
            self._open_for = self.recovery_time
            self._trials = 0
        self.failure_count = 0

    def record_failure(self) -> None:
        self.failure_count += 1
        self.last_failure_time = self._clock()
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open(longer=True)
        elif state is BreakerState.CLOSED and self.failure_count >= self.threshold:
            self._open(longer=False)

    def record_latency(self, seconds: float) -> None:
        """Adaptive mode: count requests slower than the threshold within the window."""
        if self.latency_threshold is None or seconds <= self.latency_threshold:
            return
        now = self._clock()
        self._slow.append(now)
        self._forget_old_slow(now)
        if len(self._slow) > self.slow_request_limit and self.state is BreakerState.CLOSED:
            self._open(longer=False)

    def force_open(self) -> None:
        self._open(longer=False)

    def open_until(self) -> float:
        """When the current open period ends (the clock's time), 0.0 when not open: what this
        worker tells the others (cluster/), so they avoid the backend too."""
        if self._state is BreakerState.CLOSED or self.state is not BreakerState.OPEN:
            return 0.0
        return self._opened_at + self._open_for

    def hold_open(self, until: float) -> None:
        """Another worker or host saw this backend fail: stay away from it until `until`,
        then let this breaker's own half-open trial decide. Not a trip of this breaker (its
        counters are about what it saw), and never shortens an open period."""
        now = self._clock()
        if until <= now or self.open_until() >= until:
            return
        self._opened_at = now
        self._open_for = until - now
        self._trials = 0
        self._set(BreakerState.OPEN)

    def _forget_old_slow(self, now: float) -> None:
        slow = self._slow
        while slow and now - slow[0] > self.slow_window:
            slow.popleft()

    def _open(self, longer: bool) -> None:
        if longer:
            self._open_for = min(self._open_for * 2, self.max_recovery_time)
        else:
            self._open_for = self.recovery_time
        self._opened_at = self._clock()
        self.trips += 1
        self._slow.clear()
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self.on_change is not None:
                self.on_change(self, state)

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's one JSON shape. Monotonic times become wall-clock ISO-8601 strings
        through an anchor read now from both clocks."""
        state = self.state
        last_failure = self.last_failure_time
        if last_failure is not None:
            last_failure += self._wall_clock() - self._clock()
        return {
            "state": state.value,
            "failure_count": self.failure_count,
            "trips": self.trips,
            "slow_requests": self.slow_requests,
            "open_for_s": None if state is BreakerState.CLOSED else self._open_for,
            "last_failure": iso_utc(last_failure),
        }

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.state} failures={self.failure_count}>"
