"""--workers N: processes sharing the port, admin changes reaching all, reads for the whole."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import gateway_process


async def fresh_get(url: str) -> dict:
    """One request on a new connection: the kernel may hand it to any worker."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(url) as response:
            return await response.json()


async def test_two_workers_share_the_port_and_act_as_one(cluster: Cluster, tmp_path) -> None:
    document = config_document(cluster)
    async with gateway_process(document, tmp_path, {"ROUTER_WORKER_THREADS": "2"}) as gateway:
        pids: set[int] = set()
        for _ in range(200):  # the second worker may still be starting: give it a moment
            pids.add((await fresh_get(f"{gateway.url}/health/live"))["pid"])
            if len(pids) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(pids) == 2  # both workers accept connections on the one port

        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(30):
                async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
                    assert r.status == 200
            async with http.put(
                f"{gateway.url}/api/v1/router/strategy", json={"strategy": "least_connections"}
            ) as response:
                assert response.status == 200
                assert response.headers["x-router-workers-applied"] == "2/2"
        # Every worker has the new strategy at once, whichever answers.
        strategies = {
            (await fresh_get(f"{gateway.url}/api/v1/router/strategy"))["strategy"]
            for _ in range(20)
        }
        assert strategies == {"least_connections"}

        # Reads report the whole gateway: all 30 requests, whichever worker answers.
        for _ in range(6):
            metrics = await fresh_get(f"{gateway.url}/api/v1/router/metrics")
            assert metrics["routing_metrics"]["total_requests"] == 30
            assert metrics["workers"] == {"reporting": 2, "total": 2}
            shares = metrics["load_balancing"]["backend_distribution"]
            assert sum(entry["requests"] for entry in shares.values()) == 30
            assert round(sum(entry["percentage"] for entry in shares.values())) == 100
            health = await fresh_get(f"{gateway.url}/api/v1/router/health")
            assert health["total_backends"] == 8 and health["healthy_backends"] == 8
        # Every merged read adds the workers' counts by its declared rules; percentiles come
        # from the merged samples.
        routing = metrics["routing_metrics"]
        assert routing["p99_response_time_ms"] >= routing["p50_response_time_ms"] > 0
        load = await fresh_get(f"{gateway.url}/routing/load")
        assert sum(model["requests"] for model in load["models"].values()) == 30
        models = (await fresh_get(f"{gateway.url}/models/status"))["models"]
        assert sum(model["total_requests"] for model in models.values()) == 30
        backends = await fresh_get(f"{gateway.url}/api/v1/router/backends")
        assert backends.pop("workers") == {"reporting": 2, "total": 2}
        assert sum(b["requests"] for pool in backends.values() for b in pool) == 30
        state = await fresh_get(f"{gateway.url}/api/v1/router/state")
        assert state["admission"]["in_flight"] == 0 and state["workers"]["reporting"] == 2
        performance = await fresh_get(f"{gateway.url}/routing/performance")
        assert performance["decisions"] >= 30
        breakers = await fresh_get(f"{gateway.url}/routing/circuit-breaker/status")
        assert {b["status"] for b in breakers["circuit_breakers"].values()} == {"closed"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.url}/metrics") as response:
                text = await response.text()
        total = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "router_requests_total"
        )
        assert total == 30

        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0
