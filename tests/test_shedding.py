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
    draws = random.Random(7)  # the injected source decides: one draw per request of `a`
    assert share * 1000 == sum(draws.random() < 0.5 for _ in range(1000))
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
    shed.admission.in_flight = shed.admission.queued = 1  # waiting requests count too
    assert refused(shed, router.models["b"], 10) == 10


def test_judged_from_exactly_min_requests_and_the_reason_names_the_pool() -> None:
    assert rejection_probability(10, 5, CONFIG) == pytest.approx((10 - 5 / 0.9) / 11)
    assert rejection_probability(10, 9, CONFIG) == 0.0  # 10% failed: allowed
    clock = ManualClock()
    shed, router = shedder(clock, max_rejection_probability=0.5)
    assert shed.pool_rejection("a") == 0.0 and shed.should_shed() is None
    for verdict in [OK] * 5 + [BACKEND_FAILED] * 15:
        shed.record("a", verdict)
    reason = "pool a: failure rate 75% over the last 10s, refusing 50% of its requests"
    assert shed.should_shed() == reason
    with pytest.raises(Shed) as refusal:
        for _ in range(20):
            shed.check(router.models["a"])
    assert reason in str(refusal.value) and shed.shed == 1
    assert refusal.value.headers["Retry-After"] == "1"
    shed.check(router.models["b"])  # the other pool: let through


def test_the_window_slides_by_buckets_over_a_long_quiet_spell() -> None:
    window = PoolWindow(5.0, now=1.5)  # buckets of half a second
    window.add(False, 1.5)
    window.add(True, 4.25)
    assert window.totals(6.49) == (2, 1)
    assert window.totals(6.5) == (1, 1)  # the bucket of 1.5 s has left, not that of 4.25 s
    assert window.totals(8.99) == (1, 1)
    assert window.totals(9.0) == (0, 0)
    window.add(False, 1000.0)  # far later: every old bucket is empty, counts are exact
    assert window.totals(1000.0) == (1, 0)
    window.add(True, 1004.9)
    assert window.totals(1004.9) == (2, 1) and window.totals(1005.0) == (1, 1)


def test_pending_counts_in_flight_and_queued_and_healthy_backends_are_counted() -> None:
    clock = ManualClock()
    shed, router = shedder(clock, max_pending=3, min_healthy_backends=2)
    shed.admission.in_flight, shed.admission.queued = 1, 1
    assert shed.gateway_reason() is None
    shed.admission.queued = 2
    assert shed.gateway_reason() == "3 requests pending"
    assert refused(shed, router.models["b"], 3) == 3  # pending through the queue
    for _ in range(20):
        shed.record("a", BACKEND_FAILED)
    with pytest.raises(Shed, match="3 requests pending"):  # the gateway's reason comes first
        shed.check(router.models["a"])
    shed.admission.queued = 0
    router.models["a"].upstreams[0].healthy = False
    assert shed.gateway_reason() == "fewer than 2 healthy backends"
    assert refused(shed, router.models["b"], 3) == 3


def test_disabled_it_never_sheds() -> None:
    clock = ManualClock()
    shed, router = shedder(clock, enabled=False, max_pending=1, max_rejection_probability=1.0)
    shed.admission.in_flight = 5
    for _ in range(40):
        shed.record("a", BACKEND_FAILED)
    assert shed.should_shed() is None and shed.gateway_reason() is None
    assert refused(shed, router.models["a"], 50) == 0


def test_a_reload_keeps_the_window_unless_its_length_changed() -> None:
    clock = ManualClock()
    shed, router = shedder(clock)
    for _ in range(20):
        shed.record("a", BACKEND_FAILED)
    assert shed.max_pending == 200  # max_in_flight + queue size
    same = LoadSheddingConfig(min_requests=10, max_pending=7)
    shed.reconfigure(same, router)
    assert shed.pool_rejection("a") > 0 and shed.max_pending == 7 and shed.config is same
    shed.reconfigure(LoadSheddingConfig(min_requests=10, failure_window=5.0), router)
    assert shed.pool_rejection("a") == 0.0 and shed.max_pending == 200
    _, reloaded = shedder(clock)
    reloaded.upstreams[0].healthy = False
    shed.reconfigure(LoadSheddingConfig(min_healthy_backends=2), reloaded)
    assert shed.gateway_reason() == "fewer than 2 healthy backends"  # the new router's


def test_a_pool_that_answers_again_is_not_shed_for_its_older_failures() -> None:
    """The fault ends: a bucket of answers within the allowed failure rate ends the shedding,
    though the window still holds the failures (issue 11 item 8: with two workers, the one
    that saw more of the fault shed beyond the recovery bound)."""
    clock = ManualClock()
    shed, router = shedder(clock, max_rejection_probability=0.5)
    for _ in range(40):
        shed.record("a", BACKEND_FAILED)
    assert shed.pool_rejection("a") == 0.5
    clock.advance(1.0)  # the fault ends; answers succeed again
    for _ in range(4):
        shed.record("a", OK)
    assert shed.pool_rejection("a") == 0.5  # four answers are too few: the bucket before counts
    shed.record("a", OK)
    assert shed.pool_rejection("a") == 0.0
    assert refused(shed, router.models["a"], 200) == 0
    assert shed.windows["a"].totals(clock())[0] == 45  # the failures are still in the window
    shed.record("a", BACKEND_FAILED)  # one failure in six: more than the allowed 10%
    assert shed.pool_rejection("a") > 0
