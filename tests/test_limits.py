"""Rate limits (429 + Retry-After) and load shedding (503 + Retry-After) as clients see them."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from admission import ratelimit
from admission.ratelimit import RateLimiter, TokenBucket
from config.schema import parse
from proxy.errors import RateLimited
from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document


async def statuses(http, url: str, bodies: list[dict], headers: dict | None = None) -> list:
    result = []
    for body in bodies:
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            result.append((r.status, r.headers.get("Retry-After"), (await r.json())))
    return result


async def test_global_rate_limit(cluster: Cluster, start_gateway: StartGateway, http) -> None:
    gateway = await start_gateway(config_document(cluster, rate_limit={"rps": 5}))
    results = await statuses(http, gateway.url, [chat()] * 7)
    assert [status for status, _, _ in results] == [200] * 5 + [429] * 2
    _, retry_after, body = results[-1]
    assert retry_after == "1" and body["error"]["code"] == "rate_limit_exceeded"
    assert sum(b.behaviour.requests for b in cluster.backends.values()) == 5


async def test_per_model_rpm(cluster: Cluster, start_gateway: StartGateway, http) -> None:
    document = config_document(cluster)
    document["models"]["hermes-2"]["rpm"] = 2
    gateway = await start_gateway(document)
    results = await statuses(http, gateway.url, [chat("hermes-2")] * 3 + [chat("phi-3-mini")])
    assert [status for status, _, _ in results] == [200, 200, 429, 200]
    assert "hermes-2" in results[2][2]["error"]["message"]
    assert int(results[2][1]) == 30  # one request per 30 s at 2 rpm


async def test_per_client_limit_keys_on_the_peer_when_nobody_checks_credentials(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Issue 11, item 6: a token the gateway does not verify is no identity. Rotating invented
    tokens (or API keys) used to get a fresh bucket per request; now the peer has one bucket.
    (With auth.api_keys the limit keys on the verified client: tests/test_access.py.)"""
    gateway = await start_gateway(
        config_document(cluster, rate_limit={"per_client_rps": 1, "per_client_burst": 2})
    )
    seen = []
    for index in range(6):
        header = {"Authorization": f"Bearer invented-{index}"}
        if index % 2:
            header = {"X-API-Key": f"invented-{index}"}
        seen += [s for s, _, _ in await statuses(http, gateway.url, [chat()], header)]
    assert seen == [200, 200, 429, 429, 429, 429]
    assert gateway.runtime.rate_limiter.clients.keys() == {"peer:127.0.0.1"}


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=lambda: now[0])
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == 0.5
    now[0] = 0.5
    assert bucket.take() == 0.0


async def test_shed_when_too_much_is_pending(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, load_shedding={"max_pending": 2}))
    for backend in cluster.backends.values():
        backend.behaviour.latency = 0.4
    slow = [asyncio.create_task(statuses(http, gateway.url, [chat()])) for _ in range(2)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    [(status, retry_after, body)] = await statuses(http, gateway.url, [chat()])
    assert status == 503 and time.monotonic() - started < 0.05
    assert body["error"]["code"] == "load_shed" and int(retry_after) >= 1
    assert [r[0][0] for r in await asyncio.gather(*slow)] == [200, 200]


async def test_a_failing_pool_sheds_only_its_own_requests_never_all_and_recovers(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Issue 11: one model answering 500 used to shed every pool. Now only hermes-2's own
    requests are refused, at most max_rejection_probability of them, and the window forgets
    the fault once it ends."""
    clock = ManualClock()
    gateway = await start_gateway(
        config_document(
            cluster,
            retry={"max_retries": 0},
            circuit_breaker={"threshold": 1000},
            load_shedding={
                "min_requests": 5,
                "failure_window": 0.5,
                "max_rejection_probability": 0.5,
            },
        ),
        clock=clock,
    )
    cluster["hermes-2"].behaviour.status = 500
    results = await statuses(http, gateway.url, [chat("hermes-2")] * 5)
    assert [s for s, _, _ in results] == [500] * 5
    async with http.get(f"{gateway.url}/api/v1/router/state") as response:
        state = await response.json()
    assert state["should_shed_load"] is True and "pool hermes-2" in state["shed_reason"]
    others = await statuses(http, gateway.url, [chat("phi-3-mini"), chat("openchat-3.5")] * 20)
    assert {s for s, _, _ in others} == {200}  # the other pools are untouched
    hermes = [s for s, _, _ in await statuses(http, gateway.url, [chat("hermes-2")] * 60)]
    shed = hermes.count(503)
    assert 0 < shed < 60 and set(hermes) == {500, 503}  # some still reach the backend
    cluster["hermes-2"].behaviour.status = 200
    clock.advance(0.55)  # the window has slid past the fault
    results = await statuses(http, gateway.url, [chat("hermes-2")] * 20)
    assert {s for s, _, _ in results} == {200}
    assert gateway.runtime.shedder.shed == shed


async def test_shed_when_too_few_healthy_backends(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster, load_shedding={"min_healthy_backends": 8})
    )
    [(status, _, _)] = await statuses(http, gateway.url, [chat()])
    assert status == 200
    gateway.router.models["phi-3-mini"].upstreams[0].healthy = False
    [(status, _, body)] = await statuses(http, gateway.url, [chat()])
    assert status == 503 and "healthy backends" in body["error"]["message"]


def test_token_bucket_counts_each_refill_once_and_holds_at_most_its_capacity() -> None:
    clock = ManualClock(0.0)
    bucket = TokenBucket(rate=1.0, capacity=2.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 1.0]
    clock.advance(0.5)
    assert bucket.take() == 0.5  # half a token has come back, not yet a whole one
    assert bucket.take() == 0.5  # and it was counted once
    clock.advance(100.0)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 1.0]  # full, not 100 tokens


def limiter(clock: ManualClock, rpm: int = 6, **limits: float) -> RateLimiter:
    config = parse(
        {
            "models": {"m": {"endpoints": [{"url": "http://127.0.0.1:9"}], "rpm": rpm}},
            "rate_limit": limits,
        },
        {},
    )
    return RateLimiter(config, clock)


class Asking(dict[object, object]):
    """What the limiter reads of a request: its peer, and the client control.access verified."""

    def __init__(self, remote: str | None = "10.0.0.1", client: str | None = None) -> None:
        super().__init__()
        self.remote = remote
        if client is not None:
            self[ratelimit.CLIENT] = client


def request(remote: str | None = "10.0.0.1", client: str | None = None) -> web.Request:
    return Asking(remote, client)  # type: ignore[return-value]


def refused(limits: RateLimiter, asking: web.Request, model: str | None = None) -> str | None:
    try:
        limits.check(asking, model)
    except RateLimited as error:
        return error.headers["Retry-After"]
    return None


def test_each_client_has_its_own_bucket_and_the_least_recent_is_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "MAX_CLIENT_BUCKETS", 2)
    clock = ManualClock()
    limits = limiter(clock, per_client_rps=0.5, per_client_burst=1)
    alice, bob = request(client="alice"), request(remote="10.0.0.2")
    assert refused(limits, alice) is None
    assert refused(limits, request(remote="10.0.0.9", client="alice")) == "2"  # same client
    assert refused(limits, bob) is None  # bob's bucket is his own
    assert refused(limits, request(remote="10.0.0.3")) is None  # a third client: alice is
    assert refused(limits, bob) == "2"  # the least recently seen, bob is kept
    assert refused(limits, alice) is None  # alice's bucket was forgotten: a full one again
    assert limits.limited == 2 and list(limits.clients) == ["peer:10.0.0.2", "client:alice"]
    assert refused(limits, request(remote=None)) is None
    assert "peer:unknown" in limits.clients


def test_ten_thousand_clients_are_remembered() -> None:
    limits = limiter(ManualClock(), per_client_rps=1)
    for index in range(10_001):
        limits.check(
            request(remote=f"10.{index // 256 // 256}.{index // 256 % 256}.{index % 256}"), None
        )
    assert len(limits.clients) == 10_000 and "peer:10.0.0.0" not in limits.clients
    assert "peer:10.0.0.1" in limits.clients


def test_the_global_and_model_limits_and_their_retry_after() -> None:
    clock = ManualClock()
    limits = limiter(clock, rps=2, burst=1)
    someone = request()
    assert refused(limits, someone) is None
    assert refused(limits, someone) == "1"  # 0.5 s: rounded up to whole seconds
    clock.advance(0.5)
    assert refused(limits, someone, "m") is None  # the global bucket: one per 0.5 s
    for _ in range(5):
        clock.advance(0.5)
        assert refused(limits, someone, "m") is None
    clock.advance(0.5)
    # 6 rpm: a burst of 6, then a token every 10 s; a quarter of one is back: 7.5 s to wait
    assert refused(limits, someone, "m") == "8"
    clock.advance(0.5)
    assert refused(limits, someone, "other") is None  # a model with no limit
    assert limits.active and not limiter(clock, rpm=0).active
    assert limiter(clock, rpm=0, per_client_rps=1).active


def test_a_reload_keeps_the_buckets_unless_a_limit_changed() -> None:
    clock = ManualClock()
    limits = limiter(clock, per_client_rps=1)
    limits.check(request(), None)
    assert refused(limits, request()) == "1"
    same = parse(
        {
            "models": {"m": {"endpoints": [{"url": "http://127.0.0.1:9"}], "rpm": 6}},
            "rate_limit": {"per_client_rps": 1},
        },
        {},
    )
    assert limits.reconfigured(same) is limits
    changed = parse(
        {
            "models": {"m": {"endpoints": [{"url": "http://127.0.0.1:9"}], "rpm": 7}},
            "rate_limit": {"per_client_rps": 1},
        },
        {},
    )
    fresh = limits.reconfigured(changed)
    assert fresh is not limits and fresh.limited == 1
    assert refused(fresh, request()) is None


async def test_a_rate_limited_answer_carries_openai_rate_limit_headers(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    clock = ManualClock()
    document = config_document(cluster)
    document["models"]["hermes-2"]["rpm"] = 2
    gateway = await start_gateway(document, clock=clock)
    for _ in range(2):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
            assert "x-ratelimit-limit-requests" not in r.headers
    clock.advance(15)  # half a token back of the two spent
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 429
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-reset-requests"] == "45s"  # 1.5 tokens at 1 per 30 s
        assert r.headers["Retry-After"] == "15"  # the next whole token
        assert r.headers["retry-after-ms"] == "15000"


def test_rate_limit_durations_are_written_as_openai_writes_them() -> None:
    assert ratelimit.openai_duration(0.5) == "0.5s"
    assert ratelimit.openai_duration(59.5) == "59.5s"
    assert ratelimit.openai_duration(360) == "6m0s"
    assert ratelimit.openai_duration(61.2) == "1m2s"
