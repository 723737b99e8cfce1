"""Active health checks: probe each backend on its own schedule.

A backend goes down after `fall` consecutive failed probes and comes back after `rise`
consecutive good ones (HAProxy's fall/rise), so one lost probe does not flap it. Each probe
records the response time and when it ran, for the admin API.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import aiohttp


class ProbeSettings(Protocol):
    """What the checker reads of its settings (config.schema.HealthCheckConfig): declared
    here so health/ sits below config/ (config reads the balancers, which read the rings)."""

    @property
    def interval(self) -> float: ...

    @property
    def timeout(self) -> float: ...

    @property
    def fall(self) -> int: ...

    @property
    def rise(self) -> int: ...


class Probed(Protocol):
    """What a probe reads and writes of a backend (proxy.upstream.Upstream)."""

    name: str
    url: str
    healthy: bool
    last_check: float | None
    last_response_ms: float | None


class ProbedPool(Protocol):
    """A backend's home pool: where its health path is configured."""

    @property
    def upstreams(self) -> Sequence[Probed]: ...

    @property
    def health_path(self) -> str: ...


log = logging.getLogger("request_router.health")

FIRST_ROUND = 1.0  # seconds
JITTER = 0.1  # +-10% of the interval, so probes of many backends do not fire in lockstep


class ProbeState:
    __slots__ = ("upstream", "path", "passes", "fails", "checked")

    def __init__(self, upstream: Probed, path: str) -> None:
        self.upstream = upstream
        self.path = path
        self.passes = 0
        self.fails = 0
        self.checked = False  # probed at least once

    def record(self, ok: bool, fall: int, rise: int) -> bool:
        """Count a probe result; True when the backend's health verdict changed."""
        self.checked = True
        upstream = self.upstream
        if ok:
            self.passes += 1
            self.fails = 0
            if not upstream.healthy and self.passes >= rise:
                upstream.healthy = True
                log.warning("backend %s is up again", upstream.name)
                return True
        else:
            self.fails += 1
            self.passes = 0
            if upstream.healthy and self.fails >= fall:
                upstream.healthy = False
                log.warning("backend %s is down after %d failed checks", upstream.name, fall)
                return True
        return False


class ActiveHealthChecker:
    def __init__(
        self,
        pools: Iterable[ProbedPool],
        config: ProbeSettings,
        rng: random.Random | None = None,
        on_change: Callable[[], None] | None = None,
        tls: ssl.SSLContext | None = None,
        *,
        probe_failed: Callable[[int], bool],
    ) -> None:
        """`probe_failed`: which answer statuses fail a probe; the gateway passes the one
        classification the request path uses (proxy.verdict.fails_backend)."""
        self.config = config
        self._tls = tls  # how https backends are verified (the gateway's own rule)
        self._on_change = on_change
        self._probe_failed = probe_failed
        self._rng = rng if rng is not None else random.Random()
        self.probes: dict[str, ProbeState] = {}
        for pool in pools:  # each backend's home pool: not `auto`, which only regroups them
            for upstream in pool.upstreams:
                self.probes[upstream.name] = ProbeState(upstream, pool.health_path)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tasks = [asyncio.create_task(self._loop(p)) for p in self.probes.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, probe: ProbeState) -> bool:
        assert self._session is not None
        upstream = probe.upstream
        started = time.perf_counter()
        try:
            async with self._session.get(upstream.url + probe.path) as response:
                await response.read()
                ok = not self._probe_failed(response.status)
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        upstream.last_response_ms = round((time.perf_counter() - started) * 1000, 3)
        upstream.last_check = time.time()
        if probe.record(ok, self.config.fall, self.config.rise) and self._on_change is not None:
            self._on_change()
        return ok

    def first_round_done(self) -> bool:
        """Every backend has been probed once: until then the gateway knows nothing of them
        and says "starting" (control.admin)."""
        return all(probe.checked for probe in self.probes.values())

    async def _loop(self, probe: ProbeState) -> None:
        interval = self.config.interval
        # The first round spread over at most FIRST_ROUND seconds (so "starting" is short),
        # later ones jittered around the interval so probes do not fire in lockstep.
        await asyncio.sleep(self._rng.uniform(0, min(interval, FIRST_ROUND)))
        while True:
            await self.check(probe)
            await asyncio.sleep(interval * self._rng.uniform(1 - JITTER, 1 + JITTER))
