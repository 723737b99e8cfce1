"""The routing decision API: ask where a request would go, through the same code that routes
real requests (constraints, budget, the active strategy, the decision cache), without
forwarding anything or taking a backend slot."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from admission.constraints import constraint_number
from balancers.classify import DEFAULT_SPECIALIZATIONS
from balancers.registry import strategy_names
from balancers.request import RoutingRequest
from circuit.snapshot import BreakerSnapshot
from cluster.merge import MergedReport, Rule, Snapshot
from control.admin import json_response, now_iso, upstream_snapshots, view
from health.stats import percentile
from proxy.errors import InvalidRequest, NoBackendAvailable
from proxy.forward import backends_ruled_out
from proxy.routes import parse_object, request_id
from proxy.runtime import LiveRuntime
from proxy.snapshot import UpstreamSnapshot
from proxy.upstream import Pool, Upstream
from telemetry.reports import backend_status, mean

MAX_SCENARIOS = 100
# The routing API spec names the breaker's fields its own way (README: "status",
# "failure_count", "last_failure_time"); the values are the snapshot's.
BREAKER_VIEW = {
    "status": "state",
    "failure_count": "failure_count",
    "last_failure_time": "last_failure",
}
BREAKER_STATUS_VIEW = {
    **BREAKER_VIEW,
    "slow_requests": "slow_requests",
    "trips": "trips",
    "open_for_s": "open_for_s",
}
LOAD_MERGE = {"models": {"*": {"*": UpstreamSnapshot}}}
BREAKERS_MERGE = {"circuit_breakers": {"*": BreakerSnapshot}}
PERFORMANCE_MERGE = {
    "decisions": Rule.SUM,
    "decisions_per_strategy": {"*": Rule.SUM},
    "durations": Rule.SAMPLES,  # seconds per decision
    "cache_hits": Rule.SUM,
    "cache_misses": Rule.SUM,
    "strategy": Rule.FIRST,
}


def _reasoning(pool: Pool, chosen: Upstream, eligible: list[Upstream]) -> tuple[float, str]:
    """How sure the strategy is, and why it chose `chosen`, in words."""
    strategy = pool.strategy
    model = chosen.model or chosen.name
    ties = [u for u in eligible if u.model != chosen.model]
    if strategy == "specialization":
        category = getattr(pool.balancer, "last_category", None)
        names = DEFAULT_SPECIALIZATIONS.get(category or "", ())
        matched = bool(chosen.specializations & set(names))
        specialities = ", ".join(sorted(chosen.specializations)) or "nothing in particular"
        if matched:
            return 0.9, f"classified as {category}; {model} specializes in {specialities}"
        return 0.5, f"classified as {category}; no model specializes in it, least loaded serves"
    if strategy == "cost_optimized":
        return 1.0, f"cheapest eligible model: {model} at {chosen.cost:g} per request"
    if strategy == "quality_optimized":
        return 1.0, f"highest-quality eligible model: {model} (quality {chosen.quality:g})"
    if strategy == "priority":
        return 1.0, f"highest available priority tier: {model} (priority {chosen.priority})"
    if strategy == "latency":
        latency = chosen.latency.value
        measured = f"{latency * 1000:.1f} ms peak-EWMA" if latency is not None else "unmeasured"
        return 0.7, f"lower latency x load of two sampled backends: {model} ({measured})"
    share = 1.0 / max(1, len(eligible))
    return round(share if ties else 1.0, 3), f"{strategy}: {model} is next for this pool"


def render_load(snapshot: Snapshot) -> dict[str, Any]:
    models: dict[str, dict[str, UpstreamSnapshot]] = snapshot["models"]
    total = sum(u["requests"] for backends in models.values() for u in backends.values())
    rendered = {}
    for name, backends in models.items():
        active = sum(u["active"] for u in backends.values())
        capacity = sum(u["max_concurrent"] for u in backends.values())
        requests = sum(u["requests"] for u in backends.values())
        rendered[name] = {
            "active_requests": active,
            "capacity": capacity,
            "load_factor": round(active / capacity, 4) if capacity else 0.0,
            "requests": requests,
            "share": round(requests / total * 100, 2) if total else 0.0,
            "instances": {u["name"]: u["active"] for u in backends.values()},
        }
    return {"models": rendered, "timestamp": now_iso()}


def render_breakers(snapshot: Snapshot) -> dict[str, Any]:
    breakers: dict[str, BreakerSnapshot] = snapshot["circuit_breakers"]
    return {
        "circuit_breakers": {
            name: view(breaker, BREAKER_STATUS_VIEW) for name, breaker in breakers.items()
        },
        "timestamp": now_iso(),
    }


def render_performance(snapshot: Snapshot) -> dict[str, Any]:
    """In balancers.decisions.DecisionStats.report's shape, from (merged) samples."""
    durations = snapshot["durations"]
    hits, misses = snapshot["cache_hits"], snapshot["cache_misses"]
    return {
        "decisions": snapshot["decisions"],
        "decisions_per_strategy": snapshot["decisions_per_strategy"],
        "decision_time_us": {
            "mean": round(mean(durations) * 1e6, 3),
            **{
                name: round(percentile(durations, fraction) * 1e6, 3)
                for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
            },
        },
        "cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
        },
        "strategy": snapshot["strategy"],
        "timestamp": now_iso(),
    }


class RoutingApi:
    def __init__(self, live: LiveRuntime) -> None:
        self.live = live
        self.load = MergedReport(self.load_snapshot, render_load, LOAD_MERGE)
        self.breakers = MergedReport(self.breakers_snapshot, render_breakers, BREAKERS_MERGE)
        self.performance = MergedReport(
            self.performance_snapshot, render_performance, PERFORMANCE_MERGE
        )

    def _routing_request(self, scenario: dict[str, Any]) -> RoutingRequest:
        content = scenario.get("content", "")
        if not isinstance(content, str):
            raise InvalidRequest("'content' must be a string", code="invalid_type")
        request_type = scenario.get("request_type", scenario.get("type"))
        if request_type is not None and not isinstance(request_type, str):
            raise InvalidRequest("'request_type' must be a string", code="invalid_type")
        budget = scenario.get("budget")
        session = scenario.get("session_id")
        return RoutingRequest(
            request_type=request_type,
            content=content,
            affinity_key=session if isinstance(session, str) else None,
            stream=bool(scenario.get("stream", False)),
            max_cost=constraint_number(budget, "budget") if budget is not None else None,
            max_latency_ms=(
                constraint_number(scenario["max_latency_ms"], "max_latency_ms")
                if scenario.get("max_latency_ms") is not None
                else None
            ),
            min_quality=(
                constraint_number(scenario["min_quality"], "min_quality")
                if scenario.get("min_quality") is not None
                else None
            ),
        )

    def decide_one(self, scenario: dict[str, Any], request_id: str) -> dict[str, Any]:
        runtime = self.live.runtime
        pool = runtime.router.auto
        routing = self._routing_request(scenario)
        blocked = backends_ruled_out(runtime, pool, routing)
        chosen = pool.select(blocked, routing)
        if chosen is None:
            raise NoBackendAvailable("no model backend can take a request now")
        eligible = [u for u in pool.upstreams if u.available() and u not in blocked]
        confidence, reasoning = _reasoning(pool, chosen, eligible)
        snapshot = chosen.snapshot()
        return {
            "request_id": request_id,
            "model_selection": {
                "selected_model": chosen.model,
                "confidence_score": confidence,
                "reasoning": reasoning,
                "cost_estimate": chosen.cost,
                "strategy": pool.strategy,
            },
            "load_balancing": {
                "target_instance": chosen.name,
                "target_url": chosen.url,
                "load_factor": round(chosen.active / chosen.max_concurrent, 4),
                "health_status": backend_status(snapshot),
            },
            "circuit_breaker": view(snapshot["breaker"], BREAKER_VIEW),
        }

    async def decide(self, request: web.Request) -> web.Response:
        scenario = parse_object(await request.read())
        return json_response(self.decide_one(scenario, request_id(self.live.runtime, request)))

    async def test(self, request: web.Request) -> web.Response:
        document = parse_object(await request.read())
        scenarios = document.get("test_scenarios")
        if not isinstance(scenarios, list) or not scenarios:
            raise InvalidRequest("'test_scenarios' must be a non-empty list", code="invalid_type")
        if len(scenarios) > MAX_SCENARIOS:
            raise InvalidRequest(f"at most {MAX_SCENARIOS} scenarios", code="too_many")
        base = request_id(self.live.runtime, request)
        results = []
        for index, scenario in enumerate(scenarios):
            if not isinstance(scenario, dict):
                raise InvalidRequest(
                    f"test_scenarios[{index}] must be an object", code="invalid_type"
                )
            results.append({"scenario": scenario, **self.decide_one(scenario, f"{base}.{index}")})
        return json_response({"results": results, "strategy": self.live.runtime.router.strategy})

    async def status(self, request: web.Request) -> web.Response:
        runtime = self.live.runtime
        router = runtime.router
        budget = runtime.config.budget
        spent = runtime.spent()
        return json_response(
            {
                "strategy": router.strategy,
                "available_strategies": strategy_names(),
                "pools": {name: pool.strategy for name, pool in router.pools.items()},
                "models": {
                    u.model: {
                        "cost_per_request": u.cost,
                        "quality": u.quality,
                        "priority": u.priority,
                        "specializations": sorted(u.specializations),
                    }
                    for u in router.auto.upstreams
                },
                "budget": {
                    "limit": budget.limit,
                    "period": budget.period,
                    "spent": round(spent, 6),
                    "remaining": round(max(0.0, budget.limit - spent), 6),
                    "exhausted": spent >= budget.limit,
                    "on_exhausted": budget.on_exhausted,
                },
                "timestamp": now_iso(),
            }
        )

    def load_snapshot(self) -> Snapshot:
        return {"models": upstream_snapshots(self.live.runtime.router.models.values())}

    def breakers_snapshot(self) -> Snapshot:
        return {
            "circuit_breakers": {
                u.name: u.breaker.snapshot() for u in self.live.runtime.router.upstreams
            }
        }

    def performance_snapshot(self) -> Snapshot:
        router = self.live.runtime.router
        stats = router.decisions
        return {
            "decisions": stats.count,
            "decisions_per_strategy": dict(stats.by_strategy),
            "durations": stats.durations.values[: stats.durations.count],
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "strategy": router.strategy,
        }

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/routing/decide", self.decide),
            web.post("/routing/test", self.test),
            web.get("/routing/status", self.status),
            web.get("/routing/load", self.load.handle),
            web.get("/routing/circuit-breaker/status", self.breakers.handle),
            web.get("/routing/performance", self.performance.handle),
        ]
