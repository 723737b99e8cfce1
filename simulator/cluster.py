"""Start simulated backends: one real HTTP server per endpoint of a config, or on free ports.

Written once and used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from config.schema import Config
from simulator.behaviour import Behaviour
from simulator.models import build_model_app
from simulator.vectors import add_collection, build_embedding_app, build_qdrant_app


@dataclass
class SimulatedBackend:
    name: str
    kind: str  # "model", "qdrant" or "embedding"
    url: str
    behaviour: Behaviour
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 80)


@dataclass
class Cluster:
    backends: dict[str, SimulatedBackend] = field(default_factory=dict)

    def __getitem__(self, name: str) -> SimulatedBackend:
        return self.backends[name]

    async def stop(self) -> None:
        for backend in self.backends.values():
            await backend.runner.cleanup()
        self.backends.clear()


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    runner_class: Callable[..., web.AppRunner] = web.AppRunner,
    **runner_options: Any,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = any free port) with a runner made by `runner_class`;
    returns the runner and the bound port."""
    sock = bind_socket(host, port)
    runner_options.setdefault("access_log", None)
    runner = runner_class(app, handle_signals=False, **runner_options)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]


def _app(kind: str, name: str, behaviour: Behaviour) -> web.Application:
    if kind == "qdrant":
        return build_qdrant_app(name, behaviour)
    if kind == "embedding":
        return build_embedding_app(name, behaviour)
    return build_model_app(name, behaviour)


async def start_backend(
    cluster: Cluster, kind: str, name: str, model: str | None = None, port: int = 0
) -> SimulatedBackend:
    behaviour = Behaviour()
    # Cancelling the handler when the peer goes away is how real model servers (vLLM, TGI)
    # stop generating, and lets tests see that the gateway really closed the upstream.
    try:
        runner, bound = await serve(
            _app(kind, model or name, behaviour), "127.0.0.1", port, handler_cancellation=True
        )
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot start the simulated {name} on 127.0.0.1:{port}: {exc.strerror or exc}"
            " (the demo uses the ports of the config's endpoints: point --config at a copy"
            " with other ports to move them)",
        ) from None
    backend = SimulatedBackend(name, kind, f"http://127.0.0.1:{bound}", behaviour, runner)
    cluster.backends[name] = backend
    return backend


async def start_for_config(config: Config) -> Cluster:
    """One simulator on each endpoint's own host and port, as the config describes them (the
    demo's and `python -m simulator`'s); their Qdrant holds `documents` and `test`."""
    cluster = Cluster()
    try:
        for model in config.models:
            for endpoint in model.endpoints:
                await start_backend(
                    cluster, "model", endpoint.name, model.name, urlsplit(endpoint.url).port or 80
                )
        for kind, service in (("qdrant", config.qdrant), ("embedding", config.embedding)):
            for endpoint in service.endpoints:
                backend = await start_backend(
                    cluster, kind, endpoint.name, None, urlsplit(endpoint.url).port or 80
                )
                if kind == "qdrant":  # the specification's search examples name `test`
                    add_collection(backend.runner.app, "test")
    except BaseException:
        await cluster.stop()
        raise
    return cluster
