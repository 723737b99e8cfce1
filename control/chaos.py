"""Chaos endpoints: exercise the real breaker and failover mechanisms on demand.

Disabled unless `chaos.enabled` is set, and admin-protected. They act on live state: the
breaker test trips the named backend's real breaker with recorded failures, and the failover
test makes the primary unreachable (its connections go to a closed port) while a burst of real
requests runs through the gateway's own listener: they fail on it, are retried elsewhere and
counted as failovers as any request would be, and its breaker opens on those real failures.
A pool's name stands for its first backend.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from circuit.breaker import BreakerState
from proxy.errors import ChaosDisabled, InvalidRequest, UnknownBackend
from proxy.routes import parse_object
from proxy.runtime import LiveRuntime
from proxy.upstream import Upstream
from proxy.verdict import BACKEND_FAILED, OK, SERVER_FAULTS, of_status

BURST_CONCURRENCY = 5
DEFAULT_BURST = 20
MAX_BURST = 500


def dead_port() -> socket.socket:
    """A local port that is bound but never listens: connecting to it is refused at once
    (Caddy's tests use a closed port as the dead upstream). Held until closed, so nothing
    else takes it meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def elapsed_ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


class Chaos:
    def __init__(self, live: LiveRuntime, data_port: Callable[[web.Request], int | None]) -> None:
        self.live = live
        self.data_port = data_port

    def _backend(self, document: dict[str, Any], key: str) -> Upstream:
        """The backend `document[key]` names; a pool's name (the specification's examples
        name `"qdrant"`) stands for the pool's first backend."""
        if not self.live.runtime.config.chaos.enabled:
            raise ChaosDisabled("chaos endpoints are disabled (set chaos.enabled: true)")
        name = document.get(key)
        router = self.live.runtime.router
        for upstream in router.upstreams:
            if upstream.name == name:
                return upstream
        pool = router.pools.get(name) if isinstance(name, str) else None
        if pool is not None and pool.upstreams:
            return pool.upstreams[0]
        names = ", ".join(u.name for u in router.upstreams)
        pools = ", ".join(router.pools)
        raise UnknownBackend(
            f"unknown backend {name!r} in '{key}'; backends: {names}; pools: {pools}"
        )

    def _backup(self, primary: Upstream) -> Upstream | None:
        pool = self.live.runtime.router.pools[primary.pool]
        for upstream in pool.upstreams:
            if upstream is not primary and upstream.available():
                return upstream
        if primary.model is not None:  # a model backend: another model can take `auto`
            for upstream in self.live.runtime.router.auto.upstreams:
                if upstream is not primary and upstream.available():
                    return upstream
        return None

    async def circuit_breaker_test(self, request: web.Request) -> dict[str, Any]:
        document = parse_object(await request.read())
        upstream = self._backend(document, "backend")
        breaker = upstream.breaker
        started = time.perf_counter()
        initial = breaker.snapshot()
        simulated = 0
        if document.get("simulate_failure", True):
            test_type = "simulate_failure"
            while breaker.state is not BreakerState.OPEN and simulated < breaker.threshold + 1:
                upstream.record(BACKEND_FAILED)
                simulated += 1
        else:
            test_type = "reset"
            breaker.record_success()
        backup = self._backup(upstream)
        after = breaker.snapshot()
        opened = after["state"] == BreakerState.OPEN
        return {
            "circuit_breaker_test": {
                "backend": document["backend"],  # as named: a backend, or a pool
                "target_backend": upstream.name,
                "test_type": test_type,
                "initial_state": initial["state"],
                "failure_threshold": breaker.threshold,
                "simulated_failures": simulated,
                "circuit_breaker_triggered": opened and initial["state"] != BreakerState.OPEN,
                "new_state": after["state"],
                "failover_activated": opened and backup is not None,
                "backup_backend": backup.name if backup is not None else None,
                "test_duration_ms": elapsed_ms(started),
                "recovery_time_ms": round((after["open_for_s"] or 0.0) * 1000, 3)
                if opened
                else 0.0,
            }
        }

    async def failover_test(self, request: web.Request) -> dict[str, Any]:
        document = parse_object(await request.read())
        primary = self._backend(document, "primary_backend")
        count = document.get("requests", DEFAULT_BURST)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_BURST:
            raise InvalidRequest(f"'requests' must be an integer from 1 to {MAX_BURST}")
        simulate = document.get("simulate_failure", True)
        method, path, body = self._probe_request(primary)
        port = self.data_port(request)
        if port is None:
            raise InvalidRequest("cannot find the gateway's own listener for the burst")
        url = f"http://127.0.0.1:{port}{path}"
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        # (time, status, backend, attempts) per request, as its client saw it
        outcomes: list[tuple[float, int, str | None, int]] = []
        reachable = primary.origin
        dead = dead_port()
        try:
            injected = time.perf_counter()
            if simulate:  # the primary stops answering: connections to it are refused
                client = self.live.runtime.client
                assert client is not None  # started with the app
                primary.origin = client.origin(f"http://127.0.0.1:{dead.getsockname()[1]}")
            queue = list(range(count))

            async def worker() -> None:
                while queue:
                    queue.pop()
                    try:
                        async with session.request(
                            method, url, data=body, headers={"Content-Type": "application/json"}
                        ) as response:
                            await response.read()
                            headers = response.headers
                            outcomes.append(
                                (
                                    time.perf_counter(),
                                    response.status,
                                    headers.get("x-router-backend"),
                                    int(headers.get("x-router-attempts", "0")),
                                )
                            )
                    except aiohttp.ClientError:
                        outcomes.append((time.perf_counter(), 0, None, 0))

            await asyncio.gather(*(worker() for _ in range(min(BURST_CONCURRENCY, count))))
            # Read as a client reads them (0: no answer at all). A failover is what the
            # gateway counts as one (failover_events, router_failovers_total): an answer from
            # another backend after the first attempt failed.
            failovers = [
                t for t, s, b, a in outcomes if of_status(s) is OK and a > 1 and b != primary.name
            ]
            lost = [t for t, s, _, _ in outcomes if s == 0 or of_status(s) in SERVER_FAULTS]
            backups = Counter(
                b for _, s, b, _ in outcomes if of_status(s) is OK and b != primary.name
            )

            recovery_started = time.perf_counter()
            if simulate:  # the primary is back
                primary.origin = reachable
                primary.breaker.record_success()
            recovered = False
            async with session.request(
                method, url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
                recovered = of_status(response.status) is OK
            recovery_ms = elapsed_ms(recovery_started)
        finally:
            primary.origin = reachable
            dead.close()
            await session.close()
        return {
            "failover_test": {
                "primary_backend": primary.name,
                "backup_backend": backups.most_common(1)[0][0] if backups else None,
                "failure_simulation": "backend_unreachable" if simulate else "none",
                "failover_triggered": bool(failovers),
                "failovers": len(failovers),
                "failover_time_ms": round((min(failovers) - injected) * 1000, 3)
                if failovers
                else None,
                "requests_during_failover": len(outcomes),
                "requests_lost": len(lost),
                "recovery_successful": recovered,
                "recovery_time_ms": recovery_ms,
                "total_downtime_ms": round((max(lost) - min(lost)) * 1000, 3) if lost else 0.0,
            }
        }

    def _probe_request(self, primary: Upstream) -> tuple[str, str, bytes]:
        if primary.pool == "qdrant":
            return "GET", "/qdrant/collections", b""
        if primary.pool == "embedding":
            return "POST", "/v1/embeddings", b'{"input": "failover test"}'
        router = self.live.runtime.router
        pool = router.models[primary.pool]
        alone = len(pool.upstreams) == 1 and not router.fallbacks.get(primary.pool)
        model = "auto" if alone else primary.pool
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "failover test"}],
            "max_tokens": 1,
        }
        return "POST", "/v1/chat/completions", orjson.dumps(body)
