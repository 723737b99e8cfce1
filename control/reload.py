"""Re-reading the config while running (SIGHUP, POST /api/v1/router/reload).

An invalid file changes nothing: the old config stays and the reason is reported. A valid one
is swapped in without dropping requests in flight, and backends that still exist keep their
state (in-flight counts, breakers, health). Settings bound at start-up (listen address,
workers, body limit, upstream connection pool) need a restart; a change to them is reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path

from config.reader import ConfigError
from config.schema import Config, load
from health.active import ActiveHealthChecker
from proxy.router import Router
from proxy.runtime import LiveRuntime
from proxy.transport import tls_context
from proxy.verdict import fails_backend

log = logging.getLogger("request_router")


class HealthService:
    """The active health checker of the current router; restarted when the router changes."""

    def __init__(self) -> None:
        self.checker: ActiveHealthChecker | None = None

    async def restart(self, router: Router, config: Config) -> None:
        await self.stop()
        if config.health_check.enabled:
            ca_file = config.connection_pool.ca_file
            self.checker = ActiveHealthChecker(
                router.home_pools(),
                config.health_check,
                on_change=router.refresh_health,
                probe_failed=fails_backend,
                tls=tls_context(ca_file) if ca_file else None,
            )
            self.checker.start()

    def starting(self) -> bool:
        """Health checks are on and have not yet probed every backend once."""
        return self.checker is not None and not self.checker.first_round_done()

    async def stop(self) -> None:
        if self.checker is not None:
            await self.checker.stop()
            self.checker = None

    async def running(self, live: LiveRuntime) -> AsyncIterator[None]:
        await self.restart(live.runtime.router, live.runtime.config)
        yield
        await self.stop()


def keep_runtime_strategies(router: Router, previous: Router) -> None:
    """The strategies set through the admin API (the whole router's and any pool's) carry into
    a reloaded router whose file did not change the strategy."""
    router.use_strategies(
        previous.strategy, {name: pool.strategy for name, pool in previous.pools.items()}
    )


class Reloader:
    def __init__(
        self,
        live: LiveRuntime,
        health: HealthService,
        path: str | None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`environ`: the ROUTER_* variables the file is read with, the command line's and
        --demo's included (proxy.__main__), so a reload keeps them."""
        self.live = live
        self.health = health
        self.path = path
        self.environ = environ
        # The strategy the file (with the environment) asked for when last read: a reload
        # keeps strategies set at runtime through the admin API unless the file changes it.
        self.file_strategy = live.runtime.config.routing.strategy
        self._lock = asyncio.Lock()  # two reloads at once would race on the health checker
        # Called after every reload that applied (the workers' shared record listens).
        self.on_reload: list[Callable[[], None]] = []

    async def reload(self) -> tuple[Config, list[str]]:
        """Load, validate and apply; returns the new config and the ignored changes.
        Raises ConfigError, leaving everything as it was."""
        if self.path is None or not Path(self.path).is_file():
            raise ConfigError("no config file to reload (the gateway was not started from one)")
        async with self._lock:
            loaded = await asyncio.to_thread(load, self.path, self.environ)
            running = self.live.runtime.config
            ignored = [
                f"server.{key} (restart to apply)"
                for key in ("host", "port", "workers", "max_body_bytes")
                if getattr(loaded.server, key) != getattr(running.server, key)
            ]
            if loaded.connection_pool != running.connection_pool:
                ignored.append("connection_pool (restart to apply)")
            config = replace(
                loaded,
                server=replace(
                    loaded.server,
                    host=running.server.host,
                    port=running.server.port,
                    workers=running.server.workers,
                    max_body_bytes=running.server.max_body_bytes,
                ),
                connection_pool=running.connection_pool,
            )
            runtime = self.live.runtime
            router = Router(config, previous=runtime.router)
            if config.routing.strategy == self.file_strategy:
                keep_runtime_strategies(router, runtime.router)
            self.file_strategy = config.routing.strategy
            self.live.swap(runtime.reloaded(config, router))
            await self.health.restart(router, config)
        log.info(
            "configuration reloaded from %s (strategy %s, %d backends)",
            self.path,
            config.routing.strategy,
            len(router.upstreams),
        )
        for item in ignored:
            log.warning("reload: %s", item)
        for listener in self.on_reload:
            listener()
        return config, ignored

    async def reload_logged(self) -> None:
        """For SIGHUP: nobody to answer, so the outcome goes to the log."""
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
