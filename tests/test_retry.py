"""Retry with failover, breakers on real traffic, 429 cooldowns, stale connections, fallbacks."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from email.utils import formatdate

import orjson
import pytest

from circuit.breaker import BreakerState
from config.reader import ConfigError
from config.schema import RetryConfig, parse
from proxy.retry import RetryBudget, RetryPolicy, retry_after_seconds
from proxy.upstream import Pool, Upstream
from proxy.verdict import (
    BACKEND_FAILED,
    CLIENT_ERROR,
    CLIENT_GONE,
    GATEWAY_REFUSED,
    OK,
    RETRYABLE,
    THROTTLED,
)
from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document


async def test_backend_killed_during_a_burst_costs_no_client_errors(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster))
    victim = cluster["hermes-2"]
    victim.behaviour.latency = 0.005
    statuses: Counter[int] = Counter()
    backends: Counter[str] = Counter()
    sent = 0

    async def client() -> None:
        nonlocal sent
        while sent < 500:
            sent += 1
            if sent == 150:
                victim.behaviour.drop = True  # in-flight and new requests are cut off
                asyncio.get_running_loop().create_task(victim.runner.cleanup())
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
                await r.read()
                statuses[r.status] += 1
                backends[r.headers.get("x-router-backend", f"{r.status} {await r.text()}")] += 1

    await asyncio.gather(*(client() for _ in range(20)))
    assert statuses == {200: sum(statuses.values())} and sum(statuses.values()) >= 500, backends
    assert 0 < backends["hermes-2"] < 150
    hermes = gateway.router.models["hermes-2"].upstreams[0]
    assert hermes.breaker.state is BreakerState.OPEN
    assert gateway.runtime.stats.retries > 0
    assert gateway.runtime.admission.in_flight == 0


async def test_503s_open_the_breaker_then_half_open_probes_close_it(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    document = config_document(
        cluster,
        circuit_breaker={"threshold": 3, "timeout": 0.5, "half_open_limit": 1},
        retry={"max_retries": 0},
    )
    clock = ManualClock()
    gateway = await start_gateway(document, clock=clock)
    behaviour = cluster["phi-3-mini"].behaviour
    behaviour.status = 503
    url = f"{gateway.url}/v1/chat/completions"
    for _ in range(3):
        async with http.post(url, json=chat("phi-3-mini")) as response:
            assert response.status == 503  # the backend's own answer, passed through
    breaker = gateway.router.models["phi-3-mini"].upstreams[0].breaker
    assert breaker.state is BreakerState.OPEN and breaker.failure_count == 3
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_backend_available"
    assert behaviour.requests == 3  # the open circuit kept that one away from the backend
    behaviour.status = 200
    clock.advance(0.55)
    assert breaker.state is BreakerState.HALF_OPEN
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 200
    assert breaker.state is BreakerState.CLOSED and behaviour.requests == 4


async def test_429_with_retry_after_is_retried_elsewhere_and_honoured(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    clock = ManualClock()
    gateway = await start_gateway(config_document(cluster), clock=clock)
    behaviour = cluster["mixtral-8x7b"].behaviour
    behaviour.status = 429
    behaviour.retry_after = 0.6
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat()) as response:  # round robin starts at mixtral
        assert response.status == 200
        assert response.headers["x-router-backend"] == "hermes-2"
        assert response.headers["x-router-attempts"] == "2"
    behaviour.status = 200
    seen = Counter()
    for _ in range(8):
        async with http.post(url, json=chat()) as response:
            seen[response.headers["x-router-backend"]] += 1
    assert "mixtral-8x7b" not in seen and behaviour.requests == 1
    mixtral = gateway.router.models["mixtral-8x7b"].upstreams[0]
    assert mixtral.breaker.failure_count == 0  # a 429 is a pause, not a failure
    clock.advance(0.6)
    for _ in range(4):
        async with http.post(url, json=chat()) as response:
            seen[response.headers["x-router-backend"]] += 1
    assert seen["mixtral-8x7b"] == 1


async def test_429_without_retry_after_pauses_the_backend_for_a_second(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    clock = ManualClock()
    gateway = await start_gateway(config_document(cluster), clock=clock)
    cluster["hermes-2"].behaviour.status = 429
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 429
    hermes = gateway.router.models["hermes-2"].upstreams[0]
    assert hermes.cooldown_until == clock() + 1.0
    clock.advance(0.99)
    assert not hermes.available()
    clock.advance(0.01)
    assert hermes.available()


async def test_429_from_the_only_backend_reaches_the_client(gateway, http, cluster) -> None:
    behaviour = cluster["openchat-3.5"].behaviour
    behaviour.status = 429
    behaviour.retry_after = 2
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("openchat-3.5")
    ) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
        assert response.headers["x-router-backend"] == "openchat-3.5"


async def test_stale_keep_alive_connection_is_resent_at_once(
    gateway, http, cluster: Cluster
) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat("hermes-2")) as response:
        assert response.status == 200  # the gateway now holds a kept-alive connection
    behaviour = cluster["hermes-2"].behaviour
    behaviour.drop_reused = 1
    async with http.post(url, json=chat("hermes-2")) as response:
        assert response.status == 200
        assert response.headers["x-router-attempts"] == "1"
    assert behaviour.drop_reused == 0  # the reused connection really was dropped
    assert gateway.runtime.stats.stale_retries == 1
    assert gateway.router.models["hermes-2"].upstreams[0].breaker.failure_count == 0


async def test_retries_exhausted_pass_the_last_error_through(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, retry={"max_retries": 2}))
    for backend in cluster.backends.values():
        backend.behaviour.status = 502
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
        assert response.status == 502
        assert response.headers["x-router-attempts"] == "3"
    tried = [b for b in cluster.backends.values() if b.behaviour.requests]
    assert len(tried) == 3  # three different backends, none twice


async def test_fallback_chain_serves_when_the_model_is_down(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    await cluster["mixtral-8x7b"].runner.cleanup()
    document = config_document(cluster, fallbacks={"mixtral-8x7b": ["hermes-2", "phi-3-mini"]})
    gateway = await start_gateway(document)
    url = f"{gateway.url}/v1/chat/completions"
    for _ in range(6):  # the breaker (threshold 5) opens on the way
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            assert response.status == 200
            assert response.headers["x-router-fallback"] == "hermes-2"
            assert response.headers["x-router-backend"] == "hermes-2"
    assert orjson.loads(cluster["hermes-2"].behaviour.last_body)["model"] == "hermes-2"
    assert gateway.runtime.stats.fallbacks == 6


async def test_a_model_down_goes_straight_to_its_fallback_and_back_once_it_recovers(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """While its circuit is open the chain serves without a look at the model; once the
    circuit is due for a trial, the model gets it, and serves again."""
    clock = ManualClock()
    document = config_document(
        cluster,
        fallbacks={"mixtral-8x7b": ["hermes-2"]},
        circuit_breaker={"threshold": 3, "timeout": 0.5, "half_open_limit": 1},
    )
    gateway = await start_gateway(document, clock=clock)
    mixtral = cluster["mixtral-8x7b"].behaviour
    mixtral.status = 503
    url = f"{gateway.url}/v1/chat/completions"
    for _ in range(3):  # each fails on mixtral and is answered by the chain
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            assert response.status == 200 and response.headers["x-router-backend"] == "hermes-2"
    breaker = gateway.router.models["mixtral-8x7b"].upstreams[0].breaker
    assert breaker.state is BreakerState.OPEN and mixtral.requests == 3
    for _ in range(5):
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            assert response.headers["x-router-backend"] == "hermes-2"
            assert response.headers["x-router-attempts"] == "1"  # straight to the chain
    assert mixtral.requests == 3
    mixtral.status = 200
    clock.advance(0.55)
    async with http.post(url, json=chat("mixtral-8x7b")) as response:
        assert response.status == 200 and response.headers["x-router-backend"] == "mixtral-8x7b"
        assert "x-router-fallback" not in response.headers
    assert breaker.state is BreakerState.CLOSED and mixtral.requests == 4


async def test_a_busy_model_is_queued_for_not_answered_by_its_fallback(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Full is not failing: the second request waits for mixtral's one slot (issue 12)."""
    document = config_document(cluster, fallbacks={"mixtral-8x7b": ["phi-3-mini"]})
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    gateway = await start_gateway(document)
    cluster["mixtral-8x7b"].behaviour.latency = 0.3
    url = f"{gateway.url}/v1/chat/completions"

    async def ask() -> tuple[str, str | None]:
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            assert response.status == 200
            return response.headers["x-router-backend"], response.headers.get("x-router-fallback")

    results = await asyncio.gather(ask(), ask())
    assert results == [("mixtral-8x7b", None)] * 2
    assert cluster["phi-3-mini"].behaviour.requests == 0
    assert gateway.runtime.stats.fallbacks == 0


async def test_a_chain_that_opts_in_takes_a_busy_models_traffic(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    document = config_document(
        cluster, fallbacks={"mixtral-8x7b": {"models": ["phi-3-mini"], "when_busy": True}}
    )
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    gateway = await start_gateway(document)
    cluster["mixtral-8x7b"].behaviour.latency = 0.3
    url = f"{gateway.url}/v1/chat/completions"

    async def ask() -> tuple[str, str | None]:
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            return response.headers["x-router-backend"], response.headers.get("x-router-fallback")

    results = await asyncio.gather(ask(), ask())
    assert sorted(results, key=str) == sorted(
        [("mixtral-8x7b", None), ("phi-3-mini", "phi-3-mini")], key=str
    )


async def test_a_queued_request_goes_to_the_fallback_when_its_model_fails_meanwhile(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Queued for a busy model whose backend then fails and opens its breaker: the chain
    serves the waiting request instead of leaving it to the queue timeout."""
    document = config_document(
        cluster,
        fallbacks={"mixtral-8x7b": ["phi-3-mini"]},
        circuit_breaker={"threshold": 1, "timeout": 30},
        retry={"max_retries": 0},
    )
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    gateway = await start_gateway(document)
    mixtral = cluster["mixtral-8x7b"].behaviour
    mixtral.latency = 0.3
    mixtral.status = 503
    url = f"{gateway.url}/v1/chat/completions"

    async def ask() -> tuple[int, str | None]:
        async with http.post(url, json=chat("mixtral-8x7b")) as response:
            return response.status, response.headers.get("x-router-fallback")

    first = asyncio.create_task(ask())
    await asyncio.sleep(0.1)  # mixtral's slot is taken: the second request queues
    second = await ask()
    assert await first == (503, None)
    assert second == (200, "phi-3-mini")


def test_a_fallback_chain_is_a_list_or_models_with_when_busy() -> None:
    models = {"a": {"url": "http://127.0.0.1:1"}, "b": {"url": "http://127.0.0.1:2"}}
    plain = parse({"models": models, "fallbacks": {"a": ["b"]}}, {})
    assert plain.fallbacks == {"a": ("b",)} and plain.fallback_when_busy == frozenset()
    opted = parse({"models": models, "fallbacks": {"a": {"models": ["b"], "when_busy": True}}}, {})
    assert opted.fallbacks == {"a": ("b",)} and opted.fallback_when_busy == {"a"}
    with pytest.raises(ConfigError, match="fallbacks.a.when_busy: expected true or false"):
        parse({"models": models, "fallbacks": {"a": {"models": ["b"], "when_busy": "yes"}}}, {})
    with pytest.raises(ConfigError, match="fallbacks.a.models\\[0\\]: 'c' is not another"):
        parse({"models": models, "fallbacks": {"a": {"models": ["c"]}}}, {})
    with pytest.raises(ConfigError, match="fallbacks.a.busy: unknown key"):
        parse({"models": models, "fallbacks": {"a": {"models": ["b"], "busy": True}}}, {})


async def test_timeout_before_headers_fails_over(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"first_byte_timeout": 0.2}))
    cluster["mixtral-8x7b"].behaviour.latency = 1.0
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
        assert response.status == 200
        assert response.headers["x-router-backend"] == "hermes-2"
        assert response.headers["x-router-attempts"] == "2"


def test_backoff_is_exponential_with_jitter_and_first_failover_immediate() -> None:
    random.seed(3)
    policy = RetryPolicy(RetryConfig(max_retries=3, delay=1.0, max_delay=8.0))
    assert policy.backoff(1, other_backend=True) == 0.0
    first = policy.backoff(1, other_backend=False)
    second = policy.backoff(2, other_backend=True)
    third = policy.backoff(3, other_backend=True)
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 3.0 and 4.0 <= third <= 5.0
    assert policy.backoff(9, other_backend=True) == 8.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_a_minimum_plus_a_share_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=1, window=10, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(50)) == 10  # the floor: 1/s over 10 s
    budget.requests += 100
    assert sum(budget.try_withdraw() for _ in range(50)) == 20  # plus 20% of 100 requests
    assert budget.denied == 70
    clock.now = 12  # next window: the last one's requests and retries still count
    budget.requests += 100
    assert sum(budget.try_withdraw() for _ in range(100)) == 20
    clock.now = 40  # long quiet: history forgotten, only the floor
    assert sum(budget.try_withdraw() for _ in range(100)) == 10


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), ("0.5", 0.5), (None, None), ("soon", None), ("-4", 0.0), ("99999", 300.0)],
)
def test_retry_after_parsing(value, expected) -> None:
    assert retry_after_seconds(value) == expected


def test_retry_after_http_date() -> None:
    seconds = retry_after_seconds(formatdate(time.time() + 30, usegmt=True))
    assert seconds is not None and 28 <= seconds <= 30


def one_backend_pool() -> Pool:
    return Pool("a", [Upstream("a", "http://127.0.0.1:9", "a", model="a")], "round_robin")


def test_should_retry_only_what_another_backend_may_fix_while_attempts_and_budget_last() -> None:
    clock = Clock()
    policy = RetryPolicy(RetryConfig(max_retries=2, budget_ratio=0.5, budget_min=0), clock=clock)
    policy.budget.requests = 6  # room for 3 retries
    pools = (one_backend_pool(),)
    assert policy.max_attempts == 3
    for verdict in (OK, CLIENT_ERROR, BACKEND_FAILED, CLIENT_GONE, GATEWAY_REFUSED):
        assert not policy.should_retry(verdict, 1, pools)
    assert policy.budget.retries == 0  # nothing withdrawn for a refusal
    assert policy.should_retry(THROTTLED, 1, pools) and policy.should_retry(RETRYABLE, 2, pools)
    assert not policy.should_retry(RETRYABLE, 3, pools)  # the third attempt was the last
    assert policy.budget.retries == 2
    pools[0].upstreams[0].breaker.force_open()
    assert not policy.should_retry(RETRYABLE, 1, pools)  # nowhere live to go
    assert policy.should_retry(RETRYABLE, 1, (pools[0], one_backend_pool()))  # a fallback
    assert policy.budget.retries == 3
    assert not policy.should_retry(RETRYABLE, 1, (one_backend_pool(),))  # 3 of 3 used


def test_a_reload_keeps_the_retry_budget_and_retunes_it() -> None:
    clock = Clock()
    first = RetryPolicy(RetryConfig(budget_ratio=0.2, budget_min=1), clock=clock)
    first.budget.requests = 100
    second = RetryPolicy(RetryConfig(budget_ratio=0.5, budget_min=2), first.budget)
    assert second.budget is first.budget and second.budget.requests == 100
    assert (second.budget.ratio, second.budget.min_per_second) == (0.5, 2)
    assert sum(second.budget.try_withdraw() for _ in range(100)) == 2 * 10 + 50


def test_the_budget_forgets_a_window_that_is_two_windows_old() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=10, clock=clock)
    budget.requests = 40
    assert sum(budget.try_withdraw() for _ in range(30)) == 20
    clock.now = 19  # a new window: the previous one still counts, 20 used of 0.5 x 40
    assert not budget.try_withdraw()
    budget.requests = 10
    clock.now = 39  # two windows after this one began: its history is forgotten too
    assert sum(budget.try_withdraw() for _ in range(30)) == 0
    floor = RetryBudget(ratio=0, min_per_second=1, window=10, clock=clock)
    clock.now += 10  # a new window with nothing carried over: the whole floor
    assert sum(floor.try_withdraw() for _ in range(30)) == 10


def test_backoff_waits_for_a_retry_on_the_same_backend_and_is_capped() -> None:
    random.seed(5)
    policy = RetryPolicy(RetryConfig(max_retries=5, delay=1.0, max_delay=3.0))
    assert policy.backoff(1, other_backend=True) == 0.0
    assert 1.0 <= policy.backoff(1, other_backend=False) <= 2.0  # the same backend: wait
    assert 2.0 <= policy.backoff(2, other_backend=True) <= 3.0  # not the first retry: wait
    assert policy.backoff(3, other_backend=False) == 3.0
