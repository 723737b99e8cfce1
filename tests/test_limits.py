"""Rate limits (429 + Retry-After) and load shedding (503 + Retry-After) as clients see them."""

from __future__ import annotations

import asyncio
import time

from admission.ratelimit import TokenBucket
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
