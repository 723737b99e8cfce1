"""Circuit breaker states from an injected clock: no sleeping."""

from __future__ import annotations

from circuit.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, recovery_time=60, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    assert breaker.failure_count == 3 and breaker.last_failure_time == 1000.0


def test_half_open_after_recovery_time_admits_limited_trials() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=60, half_open_limit=2, clock=clock)
    breaker.record_failure()
    clock.now += 59.9
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    for _ in range(2):
        assert breaker.allows()
        breaker.on_dispatch()
    assert not breaker.allows()


def test_half_open_success_closes_and_failure_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    breaker.on_dispatch()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 10
    assert breaker.allows()
    breaker.on_dispatch()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.failure_count == 0
