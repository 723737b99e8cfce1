"""One JSON shape per object: the upstream's and the queue's snapshots (the breaker's are in
test_breaker.py), with fixed clocks and no sleeping."""

from __future__ import annotations

import orjson

from admission.queue import Admission
from circuit.breaker import CircuitBreaker
from proxy.upstream import Upstream
from proxy.verdict import BACKEND_FAILED, OK
from tests.test_breaker import WALL, Clock


def test_upstream_snapshot_carries_its_breakers_and_wall_clock_times() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, clock=clock, wall_clock=lambda: WALL)
    upstream = Upstream(
        "hermes-2", "http://127.0.0.1:9/v1/", "hermes-2", model="hermes-2", breaker=breaker
    )
    upstream.requests, upstream.active = 3, 1
    upstream.record(OK, 0.2)
    upstream.last_check, upstream.last_response_ms = WALL - 5, 1.5
    snapshot = upstream.snapshot()
    assert snapshot == {
        "name": "hermes-2",
        "url": "http://127.0.0.1:9/v1",
        "pool": "hermes-2",
        "model": "hermes-2",
        "weight": 1.0,
        "active": 1,
        "max_concurrent": 100,
        "requests": 3,
        "failures": 0,
        "healthy": True,
        "last_check": "2023-11-14T22:13:15Z",
        "response_time_ms": 1.5,
        "cooling_down": False,
        "admin_state": "ready",
        "breaker": breaker.snapshot(),
    }
    assert orjson.loads(orjson.dumps(snapshot)) == snapshot  # plain JSON, nothing monotonic
    upstream.record(BACKEND_FAILED, 0.1)
    upstream.cool_down(3600)
    snapshot = upstream.snapshot()
    assert snapshot["failures"] == 1 and snapshot["cooling_down"] is True
    assert snapshot["breaker"]["state"] == "open"
    assert snapshot["breaker"]["last_failure"] == "2023-11-14T22:13:20Z"


def test_admission_snapshot_reports_queue_and_limits() -> None:
    clock = Clock()
    admission = Admission(max_in_flight=8, queue_size=4, queue_timeout=2.0, clock=clock)
    admission.in_flight, admission.queued, admission.rejected_full = 2, 1, 5
    admission.completed = 30
    clock.now += 10  # 30 completed in the last 10 s
    assert admission.snapshot() == {
        "in_flight": 2,
        "max_in_flight": 8,
        "queued": 1,
        "queue_size": 4,
        "drain_rate_per_s": 3.0,
        "rejected_full": 5,
        "timed_out": 0,
        "abandoned": 0,
    }
    assert repr(admission) == "<Admission 2 in flight of 8, 1 queued of 4>"
