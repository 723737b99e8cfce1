"""One verdict per outcome, and the one recording call every exchange makes on its upstream."""

from __future__ import annotations

import pytest

from circuit.breaker import BreakerState, CircuitBreaker
from proxy.upstream import Upstream
from proxy.verdict import (
    BACKEND_FAILED,
    BACKEND_FAULTS,
    CLIENT_ERROR,
    CLIENT_GONE,
    GATEWAY_REFUSED,
    OK,
    RETRYABLE,
    SERVER_FAULTS,
    THROTTLED,
    VERDICT_NAMES,
    WORTH_ANOTHER_TRY,
    fails_backend,
    of_status,
)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (99, BACKEND_FAILED),  # below 100 is no HTTP status
        (100, OK),
        (199, OK),
        (200, OK),
        (204, OK),
        (304, OK),
        (400, CLIENT_ERROR),
        (404, CLIENT_ERROR),
        (429, THROTTLED),
        (500, BACKEND_FAILED),
        (501, BACKEND_FAILED),
        (502, RETRYABLE),
        (503, RETRYABLE),
        (504, RETRYABLE),
        (599, BACKEND_FAILED),
        (600, BACKEND_FAILED),  # not HTTP: the backend is broken
        (-1, BACKEND_FAILED),
        (0, BACKEND_FAILED),  # no answer at all
    ],
)
def test_each_status_has_one_verdict(status: int, verdict: int) -> None:
    assert of_status(status) == verdict


def test_the_consumers_read_the_same_sets() -> None:
    # A 429 is worth another try but is not the backend failing; a 500 is a failure that
    # another try will not fix; a client that left is neither.
    assert THROTTLED in WORTH_ANOTHER_TRY and THROTTLED not in BACKEND_FAULTS
    assert BACKEND_FAILED in BACKEND_FAULTS and BACKEND_FAILED not in WORTH_ANOTHER_TRY
    assert CLIENT_GONE not in BACKEND_FAULTS | WORTH_ANOTHER_TRY | SERVER_FAULTS
    assert BACKEND_FAULTS <= SERVER_FAULTS
    assert len(VERDICT_NAMES) == len(set(VERDICT_NAMES)) == 7


def test_reports_name_each_verdict() -> None:
    verdicts = (
        OK,
        CLIENT_ERROR,
        THROTTLED,
        RETRYABLE,
        BACKEND_FAILED,
        CLIENT_GONE,
        GATEWAY_REFUSED,
    )
    assert [VERDICT_NAMES[v] for v in verdicts] == [
        "ok",
        "client_error",
        "throttled",
        "retryable",
        "backend_failed",
        "client_gone",
        "gateway_refused",
    ]


def test_health_probes_fail_on_what_the_request_path_counts_as_a_backend_fault() -> None:
    assert [s for s in (200, 301, 404, 429, 500, 503) if fails_backend(s)] == [500, 503]


def upstream(threshold: int = 2) -> Upstream:
    return Upstream("b", "http://127.0.0.1:1", "pool", breaker=CircuitBreaker(threshold=threshold))


def test_record_feeds_breaker_counters_rings_and_latency_in_one_call() -> None:
    backend = upstream()
    backend.record(OK, 0.25)
    assert backend.latency.value == 0.25 and backend.latencies.count == 1
    assert backend.outcomes.success_rate() == 1.0 and backend.failures == 0
    backend.record(RETRYABLE)  # unreachable: no latency to learn from
    backend.record(BACKEND_FAILED, 0.5)
    assert backend.failures == 2 and backend.latencies.count == 2
    assert backend.outcomes.success_rate() == pytest.approx(1 / 3)
    assert backend.breaker.state is BreakerState.OPEN


def test_record_of_a_client_error_a_pause_or_a_client_that_left_is_no_failure() -> None:
    backend = upstream(threshold=1)
    for verdict in (CLIENT_ERROR, THROTTLED, CLIENT_GONE):
        backend.record(verdict, 0.1)
    assert backend.failures == 0 and backend.breaker.state is BreakerState.CLOSED
    assert backend.outcomes.count == 1  # only the client error was an answer that went well
