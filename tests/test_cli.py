"""The gateway as operators run it: the console entry point in its own process, on uvloop."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import gateway_process


async def test_gateway_process_serves_and_stops_on_sigterm(cluster: Cluster, tmp_path) -> None:
    env = {"ROUTER_STRATEGY": "weighted"}
    async with gateway_process(config_document(cluster), tmp_path, env) as gateway:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
                assert (await response.json())["strategy"] == "weighted"
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
                assert response.status == 200
                assert response.headers["x-router-backend"] == "mixtral-8x7b"
            async with http.get(f"{gateway.url}/health/ready") as response:
                assert response.status == 200
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 10) == 0
        output = await gateway.output()
    assert "listening on http://127.0.0.1:" in output and "event loop uvloop" in output
    assert "draining" in output and "Traceback" not in output
