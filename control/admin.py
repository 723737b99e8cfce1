"""Admin API: strategy read and swap, backend state, and the health endpoints.

Who may call which of these is decided before any handler runs (control.access): the routes
say only which kind each is (`public_routes`, `read_routes`, `write_routes`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from admission.snapshot import AdmissionSnapshot
from balancers.registry import UnknownStrategyError, strategy_names
from cluster.merge import MergedReport, Rule, Snapshot
from config.reader import ConfigError
from control.audit import AuditLog
from control.chaos import Chaos
from control.reload import Reloader
from proxy.errors import GatewayError, InvalidRequest, UnknownBackend
from proxy.jsonbody import json_bytes
from proxy.router import Router
from proxy.routes import parse_object
from proxy.runtime import LiveRuntime, Runtime
from proxy.snapshot import UpstreamSnapshot
from proxy.upstream import ADMIN_STATES, Pool


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_bytes(data), status=status, content_type="application/json")


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def view(snapshot: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """Some of a snapshot's fields under the names an endpoint's specification gives them
    (`keys`: the answer's name -> the snapshot's); the values are never recomputed."""
    return {name: snapshot[source] for name, source in keys.items()}


def counters(runtime: Runtime) -> dict[str, int]:
    """The request path's counters: each one merges across workers by adding up."""
    return {
        **runtime.stats.as_dict(),
        "failovers": runtime.telemetry.failovers,
        "shed": runtime.shedder.shed,
        "rate_limited": runtime.rate_limiter.limited,
    }


def upstream_snapshots(pools: Iterable[Pool]) -> dict[str, dict[str, UpstreamSnapshot]]:
    return {pool.name: {u.name: u.snapshot() for u in pool.upstreams} for pool in pools}


BACKENDS_MERGE = {"*": {"*": UpstreamSnapshot}}  # pool -> backend -> snapshot
STATE_MERGE = {
    "admission": AdmissionSnapshot,
    "retry_budget": {"ratio": Rule.FIRST, "min_per_second": Rule.FIRST, "denied": Rule.SUM},
    "counters": {"*": Rule.SUM},
    "should_shed_load": Rule.ANY,
    "shed_reason": Rule.FIRST,
    "draining": Rule.ANY,
    "pools_failing_open": Rule.UNION,
}
# A model serves while every worker can serve it: one that cannot fails its share of requests.
HEALTH_MERGE = {"serving": {"*": Rule.ALL}, "strategy": Rule.FIRST, "starting": Rule.ANY}


def render_backends(snapshot: Snapshot) -> dict[str, Any]:
    """Per pool, each backend's snapshot; the spec (and scripts/test_routing.sh) also read
    its circuit's state as `circuit`."""
    return {
        pool: [{**u, "circuit": u["breaker"]["state"]} for u in backends.values()]
        for pool, backends in snapshot.items()
    }


def render_service_health(snapshot: Snapshot) -> dict[str, Any]:
    """ "healthy" while every model can be served, "degraded" when some cannot; "unhealthy"
    (503) when none; "starting" (503) until the health checks have probed every backend."""
    serving = snapshot["serving"]
    if snapshot["starting"]:  # no backend probed yet: nothing is known of them
        status = "starting"
    elif all(serving.values()):
        status = "healthy"
    elif any(serving.values()):
        status = "degraded"
    else:
        status = "unhealthy"
    return {
        "status": status,
        "service": "request-router",
        "models": list(serving),
        "load_balancing": True,
        "circuit_breaker": True,
        "strategy": snapshot["strategy"],
        "timestamp": now_iso(),
    }


def health_status(document: dict[str, Any]) -> int:
    return 503 if document["status"] in ("unhealthy", "starting") else 200


class AdminApi:
    def __init__(
        self,
        live: LiveRuntime,
        reloader: Reloader,
        audit: AuditLog,
        data_port: Callable[[web.Request], int | None],
    ) -> None:
        """`data_port(request)`: the port the proxied API answers on (the chaos burst's)."""
        self.live = live
        self.reloader = reloader
        self.chaos = Chaos(live, data_port)
        self.audit = audit
        self.backends = MergedReport(self.backends_snapshot, render_backends, BACKENDS_MERGE)
        self.health = MergedReport(
            self.health_snapshot, render_service_health, HEALTH_MERGE, health_status
        )
        self.state = MergedReport(self.state_snapshot, dict, STATE_MERGE)
        # Called after a strategy swap or a backend's state change applied (the workers'
        # shared record, and the Redis sync, listen).
        self.on_strategy_change: list[Callable[[], None]] = []

    @contextmanager
    def audited(self, request: web.Request, action: str, old: Any) -> Iterator[dict[str, Any]]:
        """Record the admin change made inside the block, or its refusal, in the audit log."""
        change: dict[str, Any] = {"old": old, "new": None}
        try:
            yield change
        except GatewayError as exc:
            self.audit.record(
                request,
                action,
                old=change["old"],
                new=change["new"],
                accepted=False,
                reason=exc.message,
            )
            raise
        self.audit.record(request, action, old=change["old"], new=change["new"], accepted=True)

    @property
    def router(self) -> Router:
        return self.live.runtime.router  # the current one: a reload replaces it

    async def get_strategy(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "strategy": self.router.strategy,
                "available_strategies": strategy_names(),
                "pools": {name: pool.strategy for name, pool in self.router.pools.items()},
            }
        )

    async def put_strategy(self, request: web.Request) -> web.Response:
        with self.audited(request, "strategy", self.router.strategy) as audit:
            return await self._put_strategy(request, audit)

    async def _put_strategy(self, request: web.Request, audit: dict[str, Any]) -> web.Response:
        document = parse_object(await request.read())
        strategy = document.get("strategy")
        audit["new"] = {"strategy": strategy, "pool": document.get("pool")}
        if not isinstance(strategy, str):
            raise InvalidRequest(
                f"'strategy' is required; valid strategies: {', '.join(strategy_names())}",
                code="invalid_strategy",
            )
        pool = document.get("pool")
        if pool is not None and pool not in self.router.pools:
            raise InvalidRequest(
                f"unknown pool {pool!r}; valid pools: {', '.join(self.router.pools)}",
                code="invalid_pool",
            )
        before = self.router.active_connections()
        try:
            previous = self.router.set_strategy(strategy, pool)
        except UnknownStrategyError as exc:
            raise InvalidRequest(str(exc), code="invalid_strategy") from None
        audit["old"] = previous
        for listener in self.on_strategy_change:
            listener()
        change: dict[str, Any] = {
            "previous_strategy": previous,
            "new_strategy": strategy,
            "change_timestamp": now_iso(),
            "active_connections_before": before,
            "active_connections_after": self.router.active_connections(),
            "strategy_applied": True,
        }
        if pool is not None:
            change["pool"] = pool
        return json_response({"strategy_change": change})

    async def put_backend_state(self, request: web.Request) -> web.Response:
        """HAProxy's `set server state`: drain (no new requests; those in flight finish),
        maint (the same, shown as maintenance) or ready. Kept across reloads (the backend
        keeps its state while its name and URL stay) until set back to ready."""
        name = request.match_info["name"]
        upstream = next((u for u in self.router.upstreams if u.name == name), None)
        with self.audited(request, "backend_state", None) as audit:
            document = parse_object(await request.read())
            state = document.get("state")
            audit["new"] = {"backend": name, "state": state}
            if upstream is None:
                names = ", ".join(u.name for u in self.router.upstreams)
                raise UnknownBackend(f"no backend named {name!r}; backends: {names}")
            if state not in ADMIN_STATES:
                raise InvalidRequest(
                    f"'state' must be one of {', '.join(ADMIN_STATES)}, got {state!r}",
                    code="invalid_state",
                )
            audit["old"] = {"backend": name, "state": upstream.admin_state}
            previous = upstream.admin_state
            upstream.set_admin_state(state)
            self.router.refresh_health()
        for listener in self.on_strategy_change:
            listener()
        return json_response(
            {
                "backend": name,
                "previous_state": previous,
                "state": upstream.admin_state,
                "in_flight": upstream.active,
                "timestamp": now_iso(),
            }
        )

    def backends_snapshot(self) -> Snapshot:
        return upstream_snapshots(self.router.home_pools())

    def health_snapshot(self) -> Snapshot:
        return {
            "serving": {
                name: any(u.healthy and u.breaker.allows() for u in pool.upstreams)
                for name, pool in self.router.models.items()
            },
            "strategy": self.router.strategy,
            "starting": self.reloader.health.starting(),
        }

    async def liveness(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive", "pid": os.getpid()})

    async def ready(self, request: web.Request) -> web.Response:
        """Ready while serving; 503 until the first health-check round is done, and once
        draining, so load balancers send traffic only to a gateway that can route it."""
        if self.live.runtime.draining:
            return json_response({"status": "draining"}, status=503)
        if self.reloader.health.starting():
            return json_response({"status": "starting"}, status=503)
        return json_response({"status": "ready", "config": self.live.runtime.config.source})

    async def reload(self, request: web.Request) -> web.Response:
        with self.audited(request, "reload", self.live.runtime.config.source) as audit:
            try:
                config, ignored = await self.reloader.reload()
            except ConfigError as exc:
                raise InvalidRequest(
                    f"configuration not reloaded, the running one stays: {exc}",
                    code="invalid_config",
                ) from None
            audit["new"] = {"config": config.source, "strategy": config.routing.strategy}
        return json_response(
            {
                "reloaded": True,
                "config": config.source,
                "strategy": config.routing.strategy,
                "models": [m.name for m in config.models],
                "backends": len(self.router.upstreams),
                "ignored_changes": ignored,
            }
        )

    async def circuit_breaker_test(self, request: web.Request) -> web.Response:
        with self.audited(request, "chaos.circuit_breaker_test", None) as audit:
            result = await self.chaos.circuit_breaker_test(request)
            test = result["circuit_breaker_test"]
            audit.update(
                old=test["initial_state"],
                new={
                    "backend": test["backend"],
                    "state": test["new_state"],
                },
            )
            return json_response(result)

    async def failover_test(self, request: web.Request) -> web.Response:
        with self.audited(request, "chaos.failover_test", None) as audit:
            result = await self.chaos.failover_test(request)
            audit["new"] = {"primary_backend": result["failover_test"]["primary_backend"]}
            return json_response(result)

    def state_snapshot(self) -> Snapshot:
        """The request path's own state: admission queue, retry budget and counters."""
        runtime = self.live.runtime
        budget = runtime.retry.budget
        shed_reason = runtime.shedder.should_shed()
        return {
            "admission": runtime.admission.snapshot(),
            "retry_budget": {
                "ratio": budget.ratio,
                "min_per_second": budget.min_per_second,
                "denied": budget.denied,
            },
            "counters": counters(runtime),
            "should_shed_load": shed_reason is not None,
            "shed_reason": shed_reason,
            "draining": runtime.draining,
            "pools_failing_open": [
                name for name, pool in self.router.pools.items() if pool.failing_open
            ],
        }

    def public_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health.handle),
            web.get("/health/live", self.liveness),
            web.get("/health/ready", self.ready),
        ]

    def read_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/router/strategy", self.get_strategy),
            web.get("/api/v1/router/backends", self.backends.handle),
            web.get("/api/v1/router/state", self.state.handle),
        ]

    def write_routes(self) -> list[web.RouteDef]:
        """Named as the audit log names their action."""
        return [
            web.put("/api/v1/router/strategy", self.put_strategy, name="strategy"),
            web.post("/api/v1/router/reload", self.reload, name="reload"),
            web.put(
                "/api/v1/router/backends/{name}/state",
                self.put_backend_state,
                name="backend_state",
            ),
            web.post(
                "/api/v1/router/circuit-breaker/test",
                self.circuit_breaker_test,
                name="chaos.circuit_breaker_test",
            ),
            web.post(
                "/api/v1/router/failover/test", self.failover_test, name="chaos.failover_test"
            ),
        ]
