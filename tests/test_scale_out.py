"""Several workers on one host behave as one gateway: limits hold for the gateway, a backend
one worker saw fail is avoided by all, a restarted worker comes back with runtime changes.

Real processes: the supervisor and its workers (`--workers 2`), simulated backends on real
sockets; every request on a fresh connection, so the kernel spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp

from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import gateway_process

TWO_WORKERS = {"ROUTER_WORKER_THREADS": "2"}


def fresh() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def worker_pids(url: str) -> set[int]:
    """Both workers' pids, once both accept connections."""
    pids: set[int] = set()
    async with fresh() as http:
        for _ in range(300):
            async with http.get(f"{url}/health/live") as response:
                pids.add((await response.json())["pid"])
            if len(pids) == 2:
                return pids
            await asyncio.sleep(0.02)
    raise AssertionError(f"only workers {pids} answered")


async def post_chat(http: aiohttp.ClientSession, url: str, model: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", json=chat(model=model)) as response:
        await response.read()
        return response.status


async def test_a_backend_cap_holds_for_the_gateway_not_per_worker(
    cluster: Cluster, tmp_path
) -> None:
    document = config_document(cluster)
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 2
    document["queue"] = {"timeout": 30}
    slow = cluster["mixtral-8x7b"].behaviour
    slow.latency = 0.3
    async with gateway_process(document, tmp_path, TWO_WORKERS) as gateway:
        await worker_pids(gateway.url)
        async with fresh() as http:
            statuses = await asyncio.gather(
                *(post_chat(http, gateway.url, "mixtral-8x7b") for _ in range(20))
            )
        assert statuses == [200] * 20
        assert slow.requests == 20
        # Per worker, each would have let 2 through: 4 at once. Shared, the cap holds.
        assert slow.max_in_flight == 2
        async with fresh() as http:
            async with http.get(f"{gateway.url}/api/v1/router/cluster") as response:
                report = await response.json()
        assert [w["worker"] for w in report["workers"]] == [0, 1]
        assert all(w["alive"] and w["in_flight"] == 0 for w in report["workers"])
        assert report["shared"]["in_flight"] == 0


async def test_a_global_rate_limit_holds_for_two_workers(cluster: Cluster, tmp_path) -> None:
    document = config_document(cluster, rate_limit={"rps": 20, "burst": 10})
    async with gateway_process(document, tmp_path, TWO_WORKERS) as gateway:
        await worker_pids(gateway.url)
        accepted = refused = 0
        started = time.monotonic()
        async with fresh() as http:
            while time.monotonic() - started < 3.0:
                statuses = await asyncio.gather(
                    *(post_chat(http, gateway.url, "hermes-2") for _ in range(10))
                )
                accepted += statuses.count(200)
                refused += statuses.count(429)
        elapsed = time.monotonic() - started
        # The gateway-wide bucket: its burst plus its rate over the run. Per worker it would
        # be twice that (138 measured). Slack, as the README states it: what the other worker
        # can grant before a sync settles it, at worst its burst and a sync's worth of rate.
        allowed = 10 + 20 * elapsed
        print(f"admitted {accepted} of {allowed:.1f} allowed in {elapsed:.1f} s")
        assert accepted <= allowed + 10 + 20 * 0.05, (accepted, allowed)
        assert accepted >= 0.8 * allowed, (accepted, allowed)  # and the limit is usable
        assert refused > 0


async def test_a_breaker_one_worker_opens_is_avoided_by_the_other(
    cluster: Cluster, tmp_path
) -> None:
    document = config_document(
        cluster,
        circuit_breaker={"threshold": 2, "timeout": 30},
        retry={"max_retries": 0, "delay": 0},
    )
    failing = cluster["phi-3-mini"].behaviour
    failing.status = 503
    async with gateway_process(document, tmp_path, TWO_WORKERS) as gateway:
        await worker_pids(gateway.url)
        # One kept-alive connection: one worker sees both failures and opens its breaker.
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                assert await post_chat(http, gateway.url, "phi-3-mini") == 503
        assert failing.requests == 2
        await asyncio.sleep(0.2)  # well within the 1 s the hint may take
        async with fresh() as http:
            statuses = await asyncio.gather(
                *(post_chat(http, gateway.url, "phi-3-mini") for _ in range(20))
            )
        assert set(statuses) == {503}
        # Without the hint the other worker would have needed two failures of its own.
        assert failing.requests == 2


async def test_a_killed_worker_comes_back_with_the_runtime_strategy_and_drains(
    cluster: Cluster, tmp_path
) -> None:
    document = config_document(cluster)
    async with gateway_process(document, tmp_path, TWO_WORKERS) as gateway:
        pids = await worker_pids(gateway.url)
        async with fresh() as http:
            async with http.put(
                f"{gateway.url}/api/v1/router/strategy", json={"strategy": "least_connections"}
            ) as response:
                assert response.status == 200
            async with http.put(
                f"{gateway.url}/api/v1/router/backends/qdrant-primary/state",
                json={"state": "drain"},
            ) as response:
                assert response.status == 200
                assert response.headers["x-router-workers-applied"] == "2/2"
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        survivors = pids - {victim}
        async with fresh() as http:
            for _ in range(300):  # the supervisor waits 1 s before starting it again
                now = set()
                for _ in range(10):
                    try:
                        async with http.get(f"{gateway.url}/health/live") as response:
                            now.add((await response.json())["pid"])
                    except aiohttp.ClientConnectionError:
                        # A connection the kernel had queued on the killed worker's own
                        # SO_REUSEPORT socket is reset when that socket goes (as with nginx's
                        # `reuseport`); the test is about what the restarted worker keeps.
                        continue
                if len(now) == 2 and now != pids:
                    break
                await asyncio.sleep(0.05)
            assert len(now) == 2 and survivors < now
            strategies = set()
            for _ in range(20):
                async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
                    strategies.add((await response.json())["strategy"])
            assert strategies == {"least_connections"}
            served = set()
            search = {"query_vector": [0.1, 0.2, 0.3], "collection": "documents"}
            for _ in range(20):  # the restarted worker keeps the drain too
                async with http.post(f"{gateway.url}/api/v1/vectors/search", json=search) as r:
                    served.add(r.headers["x-router-backend"])
            assert served == {"qdrant-secondary"}
            async with http.get(f"{gateway.url}/api/v1/router/cluster") as response:
                report = await response.json()
        assert report["generation"] == 2  # the strategy change, then the drain
        assert {w["generation"] for w in report["workers"]} == {2}
        assert {w["pid"] for w in report["workers"]} == now
