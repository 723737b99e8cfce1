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
    assert not breaker.allows()  # a re-trip doubles the open time
    clock.now += 10
    assert breaker.allows()
    breaker.on_dispatch()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.failure_count == 0
    breaker.record_failure()
    assert breaker.open_for == 10  # closing resets the growth


def test_open_time_growth_is_capped() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=10, clock=clock, max_recovery_time=35)
    breaker.record_failure()
    for expected in (20, 35, 35):
        clock.now += breaker.open_for
        assert breaker.state is BreakerState.HALF_OPEN
        breaker.record_failure()
        assert breaker.open_for == expected


def test_adaptive_mode_opens_on_slowness_before_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        threshold=5, clock=clock, latency_threshold=2.0, slow_request_limit=3, slow_window=60
    )
    for _ in range(3):
        breaker.record_latency(2.5)
        clock.now += 1
    breaker.record_latency(1.0)  # fast requests do not count
    assert breaker.state is BreakerState.CLOSED and breaker.slow_requests == 3
    clock.now += 61  # slow requests older than the window are forgotten
    assert breaker.slow_requests == 0
    for _ in range(4):
        breaker.record_latency(3.0)
    assert breaker.state is BreakerState.OPEN and breaker.failure_count == 0


def test_adaptive_mode_off_ignores_latency() -> None:
    breaker = CircuitBreaker(threshold=1, clock=Clock())
    for _ in range(10):
        breaker.record_latency(100.0)
    assert breaker.state is BreakerState.CLOSED


def test_state_change_listener_sees_every_transition() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=5, clock=clock)
    seen: list[str] = []
    breaker.on_change = lambda _breaker, state: seen.append(state.value)
    breaker.record_failure()
    clock.now += 5
    breaker.on_dispatch()
    breaker.record_success()
    assert seen == ["open", "half_open", "closed"]


WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def test_snapshot_of_a_closed_breaker() -> None:
    breaker = CircuitBreaker(clock=Clock(), wall_clock=lambda: WALL)
    assert breaker.snapshot() == {
        "state": "closed",
        "failure_count": 0,
        "trips": 0,
        "slow_requests": 0,
        "open_for_s": None,
        "last_failure": None,
    }


def test_snapshot_dates_the_last_failure_on_the_wall_clock() -> None:
    clock = Clock()
    wall = Clock()
    wall.now = WALL
    breaker = CircuitBreaker(threshold=2, recovery_time=10, clock=clock, wall_clock=wall)
    breaker.record_failure()
    breaker.record_failure()  # at monotonic 1000: opens
    clock.now += 30
    wall.now += 30  # read 30 s later: the failure was at WALL, whatever the monotonic origin
    snapshot = breaker.snapshot()
    assert snapshot["last_failure"] == "2023-11-14T22:13:20Z"
    assert snapshot["state"] == "half_open" and snapshot["trips"] == 1
    assert snapshot["failure_count"] == 2 and snapshot["open_for_s"] == 10
    breaker.on_dispatch()
    clock.now += 0.25
    wall.now += 0.25
    breaker.record_failure()  # the trial failed: open twice as long
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "open" and snapshot["open_for_s"] == 20
    assert snapshot["trips"] == 2 and snapshot["last_failure"] == "2023-11-14T22:13:50.250000Z"
    breaker.record_success()
    assert breaker.snapshot()["open_for_s"] is None


def test_snapshot_counts_slow_requests_in_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock, wall_clock=lambda: WALL, latency_threshold=1.0)
    breaker.record_latency(2.0)
    breaker.record_latency(2.0)
    assert breaker.snapshot()["slow_requests"] == 2
    clock.now += 61
    assert breaker.snapshot()["slow_requests"] == 0


def test_every_half_open_period_admits_its_trials_again() -> None:
    """The second cycle: a failed trial reopens the breaker, and when it turns half-open again
    it lets a trial through again (with half_open_limit 1 it would otherwise stay shut)."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=10, half_open_limit=1, clock=clock)
    breaker.record_failure()
    for open_for in (10, 20, 40):
        assert breaker.open_for == open_for and breaker.is_open() and not breaker.allows()
        clock.now += open_for
        assert breaker.allows() and not breaker.is_open()
        breaker.on_dispatch()
        assert not breaker.allows()  # one trial at a time
        breaker.record_failure()  # the trial failed
    clock.now += 80
    assert breaker.allows()
    breaker.on_dispatch()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
    for _ in range(5):
        breaker.on_dispatch()  # closed: nothing is counted as a trial
    breaker.record_failure()
    clock.now += 10
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows()


def test_open_time_doubles_up_to_eight_times_the_recovery_time_by_default() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=10, clock=clock)
    breaker.record_failure()
    seen = []
    for _ in range(5):
        clock.now += breaker.open_for
        breaker.record_failure()
        seen.append(breaker.open_for)
    assert seen == [20, 40, 80, 80, 80]
    assert breaker.trips == 6


def test_a_failure_while_open_does_not_extend_the_open_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, recovery_time=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5
    breaker.record_failure()  # a request that was in flight when it opened
    assert breaker.trips == 1 and breaker.open_for == 10
    clock.now += 5
    assert breaker.state is BreakerState.HALF_OPEN


def test_slowness_counts_strictly_above_the_threshold_within_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        clock=clock, latency_threshold=2.0, slow_request_limit=2, slow_window=60
    )
    breaker.record_latency(2.0)  # at the threshold: not slow
    breaker.record_latency(2.01)
    assert breaker.slow_requests == 1
    clock.now += 60
    assert breaker.slow_requests == 1  # exactly a window old: still counted
    breaker.record_latency(3.0)
    assert breaker.state is BreakerState.CLOSED  # two slow requests: at the limit, not above
    clock.now += 0.5
    assert breaker.slow_requests == 1  # the first has left the window
    breaker.record_latency(3.0)
    breaker.record_latency(3.0)
    assert breaker.state is BreakerState.OPEN and breaker.trips == 1
    assert breaker.slow_requests == 0  # opening starts a fresh count
    clock.now += 60
    breaker.record_success()
    for _ in range(2):
        breaker.record_latency(5.0)
    assert breaker.state is BreakerState.CLOSED


def test_the_listener_hears_each_change_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=5, clock=clock)
    seen: list[str] = []
    breaker.on_change = lambda _breaker, state: seen.append(state.value)
    breaker.force_open()
    breaker.force_open()
    breaker.record_success()
    breaker.record_success()
    assert seen == ["open", "closed"]
    assert breaker.trips == 2 and repr(breaker) == "<CircuitBreaker closed failures=0>"


def test_opening_by_hand_or_on_slowness_starts_at_the_recovery_time() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, recovery_time=10, clock=clock)
    breaker.force_open()
    assert breaker.open_for == 10
    clock.now += 10
    breaker.record_failure()  # a failed trial: 20
    assert breaker.open_for == 20
    breaker.force_open()  # an operator's open is a fresh one
    assert breaker.open_for == 10
    slow = CircuitBreaker(
        recovery_time=10, clock=clock, latency_threshold=1.0, slow_request_limit=1
    )
    slow.record_latency(2.0)
    slow.record_latency(2.0)
    assert slow.is_open() and slow.open_for == 10


def test_slow_requests_older_than_the_window_do_not_open_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        clock=clock, latency_threshold=1.0, slow_request_limit=2, slow_window=10
    )
    for _ in range(2):
        breaker.record_latency(5.0)
    clock.now += 11
    breaker.record_latency(5.0)  # the two before have left the window
    assert breaker.state is BreakerState.CLOSED
