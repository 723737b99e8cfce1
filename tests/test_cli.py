"""The gateway as operators run it: the console entry point in its own process, on uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from simulator.cluster import Cluster
from tests.conftest import chat, config_document

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_gateway_process_serves_and_stops_on_sigterm(cluster: Cluster, tmp_path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config_document(cluster)))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(path),
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, "ROUTER_STRATEGY": "weighted"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{base}/health/live") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with http.get(f"{base}/api/v1/router/strategy") as response:
                assert (await response.json())["strategy"] == "weighted"
            async with http.post(f"{base}/v1/chat/completions", json=chat()) as response:
                assert response.status == 200
                assert response.headers["x-router-backend"] == "mixtral-8x7b"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        output = (await process.stdout.read()).decode()
        assert "listening on http://127.0.0.1:" in output and "event loop uvloop" in output
        assert "Traceback" not in output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
