"""Run the gateway as operators do: `python -m proxy` in its own process, on uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GatewayProcess:
    url: str
    config_path: Path
    process: asyncio.subprocess.Process

    def write_config(self, document: dict[str, Any] | str) -> None:
        text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
        self.config_path.write_text(text)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def output(self) -> str:
        assert self.process.stdout is not None
        return (await self.process.stdout.read()).decode()


@asynccontextmanager
async def gateway_process(
    document: dict[str, Any], tmp_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[GatewayProcess]:
    path = tmp_path / "router.yaml"
    port = free_port()
    running = GatewayProcess(
        f"http://127.0.0.1:{port}",
        path,
        await _spawn(path, document, port, env),
    )
    try:
        await _wait_until_live(running)
        yield running
    finally:
        if running.process.returncode is None:
            running.process.send_signal(signal.SIGKILL)
            await running.process.wait()


async def _spawn(
    path: Path, document: dict[str, Any], port: int, env: dict[str, str] | None
) -> asyncio.subprocess.Process:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(path),
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def _wait_until_live(running: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(150):
            if running.process.returncode is not None:
                raise RuntimeError(f"gateway exited early:\n{await running.output()}")
            try:
                async with http.get(f"{running.url}/health/live") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise RuntimeError("gateway did not come up within 15 s")
