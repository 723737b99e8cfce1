"""Shared fixtures: simulated backends on free ports and a real gateway in front of them."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from config.schema import Config, parse
from proxy.app import RUNNER_OPTIONS, RUNTIME_KEY, build_app, make_runner
from proxy.router import Router
from proxy.runtime import LiveRuntime, Runtime
from simulator.cluster import Cluster, serve, start_backend

MODELS = {
    # name: (weight, max_concurrent, cost_per_request), as in config/router_config.yaml
    "mixtral-8x7b": (1.0, 10, 0.0027),
    "hermes-2": (0.8, 20, 0.0018),
    "openchat-3.5": (0.6, 50, 0.0012),
    "phi-3-mini": (0.4, 100, 0.0004),
}
TRAITS = {
    # name: (quality, priority, specializations, capabilities)
    "mixtral-8x7b": (
        0.9,
        1,
        ["general", "coding", "analysis"],
        ["chat", "completion", "function_calling"],
    ),
    "hermes-2": (0.8, 2, ["conversation", "chat", "dialogue"], ["chat", "completion"]),
    "openchat-3.5": (0.75, 3, ["interactive", "real-time", "streaming"], ["chat", "completion"]),
    "phi-3-mini": (0.6, 4, ["efficient", "fast", "lightweight"], ["chat", "completion"]),
}


def open_descriptors() -> set[tuple[str, str]]:
    """(fd, what it points to): numbers alone miss an fd closed and reused by another file."""
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return set()
    return {(fd, _target(fd)) for fd in os.listdir(fd_dir)}


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Every test must leave no task running and no socket or file open: set up before and
    torn down after every other fixture of the test, so their cleanup counts."""
    before = open_descriptors()
    yield
    current = asyncio.current_task()
    leaked_tasks: list[asyncio.Task[object]] = []
    leaked_fds: set[str] = set()  # the loop's epoll fd (anon_inode) lives with the loop
    for _ in range(50):  # closing transports and finishing tasks takes a few loop turns
        await asyncio.sleep(0.02)
        leaked_tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        leaked_fds = {
            f"{fd} -> {target}"
            for fd, target in open_descriptors() - before
            if target != "?" and not target.startswith("anon_inode:")
        }
        if not leaked_tasks and not leaked_fds:
            return
    details = [f"task {t!r}" for t in leaked_tasks]
    details += [f"fd {fd}" for fd in sorted(leaked_fds)]
    pytest.fail("test leaked:\n" + "\n".join(details))


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    cluster = Cluster()
    for name in MODELS:
        await start_backend(cluster, "model", name, name)
    for name in ("qdrant-primary", "qdrant-secondary"):
        await start_backend(cluster, "qdrant", name)
    for name in ("embedding-gpu0", "embedding-gpu1"):
        await start_backend(cluster, "embedding", name)
    yield cluster
    await cluster.stop()


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def config_document(cluster: Cluster, **changes: Any) -> dict[str, Any]:
    """A config for `cluster`; health checks off so that tests count only their own requests."""
    document: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "health_check": {"enabled": False},
        "accounting": {"enabled": False},
        "logging": {"audit_log": None},
        "retry": {"delay": 0},
        "models": {
            name: {
                "weight": weight,
                "max_concurrent": max_concurrent,
                "cost_per_request": cost,
                "quality": TRAITS[name][0],
                "priority": TRAITS[name][1],
                "specializations": TRAITS[name][2],
                "capabilities": TRAITS[name][3],
                "endpoints": [{"url": cluster[name].url}],
            }
            for name, (weight, max_concurrent, cost) in MODELS.items()
        },
        "qdrant": {
            "endpoints": [
                {"name": name, "url": cluster[name].url}
                for name in ("qdrant-primary", "qdrant-secondary")
            ]
        },
        "embedding": {
            "endpoints": [
                {"name": name, "url": cluster[name].url}
                for name in ("embedding-gpu0", "embedding-gpu1")
            ]
        },
    }
    return merge(document, changes)


@dataclass
class RunningGateway:
    url: str
    router: Router
    config: Config
    live: LiveRuntime

    @property
    def runtime(self) -> Runtime:
        """The request path's own state now (admission, retry, counters): a reload swaps it."""
        return self.live.runtime


StartGateway = Callable[..., Awaitable[RunningGateway]]


class ManualClock:
    """A monotonic clock that moves only when a test says so: breakers, cool-downs, windows
    and budgets read it, so a test advances time instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    runners: list[web.AppRunner] = []

    async def start(
        document: dict[str, Any] | Config,
        environ: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> RunningGateway:
        config = document if isinstance(document, Config) else parse(document, environ or {})
        router = Router(config, clock=clock)
        app = build_app(config, router, clock=clock)
        runner, port = await serve(app, "127.0.0.1", 0, make_runner, **RUNNER_OPTIONS)
        runners.append(runner)
        return RunningGateway(f"http://127.0.0.1:{port}", router, config, app[RUNTIME_KEY])

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(cluster: Cluster, start_gateway: StartGateway) -> RunningGateway:
    return await start_gateway(config_document(cluster))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(model: str | None = "auto", stream: bool = False, content: str = "Hello") -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    return body
