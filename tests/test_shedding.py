"""Admission control per pool (admission.shedding), driven by a fake clock and a seeded
random source: what counts, how the probability follows the window, and what is never shed."""

from __future__ import annotations

import random

import pytest

from admission.queue import Admission
from admission.shedding import LoadShedder, PoolWindow, rejection_probability
from config.schema import LoadSheddingConfig, parse
from proxy.errors import Shed
from proxy.router import Router
from proxy.verdict import (
    BACKEND_FAILED,
    CLIENT_ERROR,
    CLIENT_GONE,
    GATEWAY_REFUSED,
    OK,
    RETRYABLE,
    THROTTLED,
)
from tests.conftest import ManualClock

CONFIG = LoadSheddingConfig(min_requests=10, max_failure_rate=0.1, failure_window=10.0)


def test_the_probability_is_zero_for_a_healthy_pool_and_capped_for_a_dead_one() -> None:
    assert rejection_probability(100, 100, CONFIG) == 0.0
    assert rejection_probability(100, 91, CONFIG) == 0.0  # within the allowed 10%
    assert rejection_probability(100, 50, CONFIG) == pytest.approx((100 - 50 / 0.9) / 101)
    assert rejection_probability(100, 0, CONFIG) == CONFIG.max_rejection_probability < 1
    assert rejection_probability(9, 0, CONFIG) == 0.0  # too few answers to judge


def test_the_window_forgets_a_tenth_at_a_time() -> None:
    window = PoolWindow(10.0, now=0.0)
    for second in range(10):
        window.add(False, float(second))
    assert window.totals(9.5) == (10, 0)
    assert window.totals(10.0) == (9, 0)  # the bucket of second 0 has left
    assert window.totals(25.0) == (0, 0)
    window.add(True, 25.0)
    assert window.totals(25.0) == (1, 1)


def shedder(clock: ManualClock, **settings: object) -> tuple[LoadShedder, Router]:
    config = parse(
        {
            "models": {
                "a": {"endpoints": [{"url": "http://127.0.0.1:9"}]},
                "b": {"endpoints": [{"url": "http://127.0.0.1:10"}]},
            },
            "load_shedding": {"min_requests": 10, **settings},
        },
        {},
    )
    router = Router(config, clock=clock)
    admission = Admission(100, 100, 1.0, clock)
    return LoadShedder(config.load_shedding, admission, router, clock, random.Random(7)), router


def refused(shedder: LoadShedder, pool: object, tries: int) -> int:
    count = 0
    for _ in range(tries):
        try:
            shedder.check(pool)  # type: ignore[arg-type]
        except Shed:
            count += 1
    return count


def test_only_backend_answers_count() -> None:
    clock = ManualClock()
    shed, _ = shedder(clock)
    for verdict in (OK, CLIENT_ERROR, THROTTLED, RETRYABLE, BACKEND_FAILED):
        shed.record("a", verdict)
    for verdict in (GATEWAY_REFUSED, CLIENT_GONE):
        shed.record("a", verdict)
    assert shed.windows["a"].totals(clock()) == (5, 2)


def test_a_failing_pool_is_shed_in_part_and_the_others_not_at_all() -> None:
    clock = ManualClock()
    shed, router = shedder(clock, max_rejection_probability=0.5)
    for _ in range(40):
        shed.record("a", BACKEND_FAILED)
        shed.record("b", OK)
    share = refused(shed, router.models["a"], 1000) / 1000
    assert 0.45 < share < 0.55
    assert refused(shed, router.models["b"], 1000) == 0
    clock.advance(10.0)  # the fault has left the window
    assert refused(shed, router.models["a"], 1000) == 0


def test_a_pool_whose_breaker_is_half_open_is_never_shed() -> None:
    clock = ManualClock()
    shed, router = shedder(clock, max_rejection_probability=1.0)
    for _ in range(40):
        shed.record("a", BACKEND_FAILED)
    pool = router.models["a"]
    breaker = pool.upstreams[0].breaker
    breaker.recovery_time = 1.0
    breaker.force_open()
    assert refused(shed, pool, 100) > 90  # open: p = 40 / 41
    clock.advance(1.0)  # half-open: its trial requests must get through
    assert refused(shed, pool, 100) == 0


def test_saturation_sheds_every_pool() -> None:
    clock = ManualClock()
    shed, router = shedder(clock, max_pending=2)
    shed.admission.in_flight = 2
    assert refused(shed, router.models["b"], 10) == 10
    assert "2 requests pending" in (shed.should_shed() or "")
