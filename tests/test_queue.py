"""The admission queue as clients see it: waiting, priority, full, timeout, disconnects."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from simulator.cluster import Cluster
from tests.conftest import RunningGateway, StartGateway, chat, config_document


def one_slot_config(cluster: Cluster, **queue: object) -> dict:
    document = config_document(cluster, queue={"timeout": 5, **queue})
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    return document


async def post(
    http: aiohttp.ClientSession, gateway: RunningGateway, body: dict, headers: dict | None = None
) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        data = await response.json()
        return response.status, {**response.headers, "_body": data}, time.monotonic() - started


async def test_request_waits_for_a_free_slot_and_is_served(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster))
    cluster["mixtral-8x7b"].behaviour.latency = 0.3
    results = await asyncio.gather(*(post(http, gateway, chat("mixtral-8x7b")) for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert max(elapsed for _, _, elapsed in results) >= 0.85  # served one after another
    assert cluster["mixtral-8x7b"].behaviour.max_in_flight == 1
    assert gateway.router.models["mixtral-8x7b"].upstreams[0].active == 0


async def test_queue_full_is_503_at_once_with_retry_after(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, size=1))
    cluster["mixtral-8x7b"].behaviour.latency = 0.5
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    status, headers, elapsed = await post(http, gateway, chat("mixtral-8x7b"))
    assert status == 503 and elapsed < 0.05
    assert headers["_body"]["error"]["code"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    assert (await first)[0] == 200 and (await queued)[0] == 200


async def test_waiting_longer_than_queue_timeout_is_503(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, timeout=0.2))
    cluster["mixtral-8x7b"].behaviour.latency = 0.6
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    status, headers, elapsed = await post(http, gateway, chat("mixtral-8x7b"))
    assert status == 503 and 0.15 < elapsed < 0.5
    assert headers["_body"]["error"]["code"] == "queue_timeout"
    assert "Retry-After" in headers
    assert (await first)[0] == 200
    assert cluster["mixtral-8x7b"].behaviour.requests == 1


async def test_queued_client_that_disconnects_frees_its_place_and_uses_no_backend(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, size=1))
    behaviour = cluster["mixtral-8x7b"].behaviour
    behaviour.latency = 0.5
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    leaver = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    assert gateway_admission(gateway).queued == 1
    leaver.cancel()
    await asyncio.sleep(0.1)
    assert gateway_admission(gateway).queued == 0
    status, _, _ = await post(http, gateway, chat("mixtral-8x7b"))  # the freed place is usable
    assert status == 200
    assert (await first)[0] == 200
    assert behaviour.requests == 2  # the leaver never reached the backend
    assert gateway_admission(gateway).abandoned == 1


async def test_high_priority_is_served_before_earlier_normal_requests(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster))
    cluster["mixtral-8x7b"].behaviour.latency = 0.2
    order: list[str] = []

    async def tagged(tag: str, priority: str, delay: float) -> None:
        await asyncio.sleep(delay)
        body = chat("mixtral-8x7b", content=tag)
        status, _, _ = await post(http, gateway, body, {"X-Priority": priority})
        assert status == 200
        order.append(tag)

    await asyncio.gather(
        tagged("busy", "normal", 0),
        tagged("low", "low", 0.05),
        tagged("normal", "normal", 0.07),
        tagged("high", "high", 0.09),
    )
    assert order == ["busy", "high", "normal", "low"]


async def test_global_cap_bounds_everything_in_flight(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"max_concurrent_requests": 2}))
    for backend in cluster.backends.values():
        backend.behaviour.latency = 0.2
    results = await asyncio.gather(*(post(http, gateway, chat("auto")) for _ in range(6)))
    assert all(status == 200 for status, _, _ in results)
    assert sum(b.behaviour.max_in_flight for b in cluster.backends.values()) <= 4
    peak = max(elapsed for _, _, elapsed in results)
    assert peak >= 0.55  # three waves of two
    assert gateway_admission(gateway).in_flight == 0


def gateway_admission(gateway: RunningGateway):
    return gateway.runtime.admission
