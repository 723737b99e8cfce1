"""Read-only reports in the specified shapes: router health, routing metrics, model status.

Everything here is computed from state the request path already keeps (Upstream counters,
breakers, health verdicts, Telemetry windows) when an endpoint is read, never per request.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from circuit.breaker import BreakerState
from control.admin import json_response, now_iso
from proxy.runtime import LiveRuntime
from proxy.upstream import Upstream
from telemetry.outcome import SeriesStats, iso

HEALTH_WEIGHTS = (0.5, 0.3, 0.2)  # success rate, latency, spare capacity
DASHBOARD = Path(__file__).resolve().parent / "static" / "dashboard.html"


def backend_status(upstream: Upstream) -> str:
    if upstream.breaker.is_open():
        return "circuit_open"
    return "healthy" if upstream.healthy else "unhealthy"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def health_score(
    upstreams: tuple[Upstream, ...], series: SeriesStats | None, latency_threshold: float
) -> float:
    """0-100 from recent success rate, p95 latency against the slow threshold, and load;
    0 when every backend's circuit is open or every backend is unhealthy."""
    if not upstreams or all(u.breaker.is_open() or not u.healthy for u in upstreams):
        return 0.0
    success = series.outcomes.success_rate() if series is not None else 1.0
    p95 = series.latency.percentile(0.95) if series is not None and series.requests else 0.0
    latency = 1.0 if p95 <= latency_threshold else latency_threshold / p95
    capacity = sum(u.max_concurrent for u in upstreams)
    load = sum(u.active for u in upstreams) / capacity if capacity else 1.0
    w_success, w_latency, w_load = HEALTH_WEIGHTS
    return round(100 * (w_success * success + w_latency * latency + w_load * (1 - load)), 1)


class Reports:
    def __init__(self, live: LiveRuntime) -> None:
        self.live = live
        self.dashboard_page = DASHBOARD.read_bytes()

    async def dashboard(self, request: web.Request) -> web.Response:
        """A self-contained page (no CDN: inline script and canvas charts) that reads only the
        JSON endpoints and switches strategy through the admin API."""
        return web.Response(body=self.dashboard_page, content_type="text/html", charset="utf-8")

    async def router_health(self, request: web.Request) -> web.Response:
        router = self.live.runtime.router
        status: dict[str, dict[str, Any]] = {}
        healthy = 0
        for pool in router.home_pools():
            status[pool.name] = {}
            for u in pool.upstreams:
                state = backend_status(u)
                healthy += state == "healthy"
                status[pool.name][u.name] = {
                    "status": state,
                    "response_time_ms": u.last_response_ms,
                    "last_check": iso(u.last_check),
                    "circuit_breaker": u.breaker.state.value,
                    "active_requests": u.active,
                }
        total = len(router.upstreams)
        overall = "healthy" if healthy == total else "degraded" if healthy else "unhealthy"
        return json_response(
            {
                "health_status": status,
                "overall_health": overall,
                "total_backends": total,
                "healthy_backends": healthy,
                "unhealthy_backends": total - healthy,
                "pools_failing_open": [p.name for p in router.home_pools() if p.failing_open],
                "timestamp": now_iso(),
            }
        )

    async def routing_metrics(self, request: web.Request) -> web.Response:
        runtime = self.live.runtime
        router = runtime.router
        telemetry = runtime.telemetry
        served = {u.name: u.requests for u in router.upstreams}
        total_served = sum(served.values())
        shares = [count / total_served * 100 for count in served.values()] if total_served else []
        mean = sum(shares) / len(shares) if shares else 0.0
        variance = sum((share - mean) ** 2 for share in shares) / len(shares) if shares else 0.0
        finished = telemetry.successful + telemetry.failed
        failovers = telemetry.successful_failovers
        return json_response(
            {
                "routing_metrics": {
                    "total_requests": telemetry.total,
                    "successful_requests": telemetry.successful,
                    "failed_requests": telemetry.failed,
                    "success_rate": round(telemetry.successful / finished, 4) if finished else 1.0,
                    "avg_response_time_ms": ms(telemetry.latency.mean()),
                    "p50_response_time_ms": ms(telemetry.latency.percentile(0.5)),
                    "p99_response_time_ms": ms(telemetry.latency.percentile(0.99)),
                    "avg_ttft_ms": ms(telemetry.ttft.mean()),
                    "avg_gateway_overhead_ms": ms(telemetry.overhead.mean()),
                    "requests_per_second": round(telemetry.rate.per_second(), 3),
                    "in_flight": runtime.admission.in_flight,
                    "queued": runtime.admission.queued,
                },
                "load_balancing": {
                    "strategy": router.strategy,
                    "backend_distribution": {
                        name: {
                            "requests": count,
                            "percentage": round(count / total_served * 100, 2)
                            if total_served
                            else 0.0,
                        }
                        for name, count in served.items()
                    },
                    "distribution_variance": round(variance, 4),
                },
                "circuit_breakers": {
                    u.name: {
                        "status": u.breaker.state.value,
                        "failure_count": u.breaker.failure_count,
                        "last_failure": self._wall_time(u.breaker.last_failure_time),
                        "slow_requests": u.breaker.slow_requests,
                        "trips": u.breaker.trips,
                    }
                    for u in router.upstreams
                },
                "failover_events": {
                    "total_failovers": telemetry.failovers,
                    "successful_failovers": failovers,
                    "avg_failover_time_ms": ms(telemetry.failover_time_total / failovers)
                    if failovers
                    else 0.0,
                    "last_failover": iso(telemetry.last_failover),
                },
                "counters": {
                    **runtime.stats.as_dict(),
                    "shed": runtime.shedder.shed,
                    "rate_limited": runtime.rate_limiter.limited,
                },
                "accounting": runtime.accountant.state() if runtime.accountant else None,
            }
        )

    @staticmethod
    def _wall_time(monotonic_time: float | None) -> str | None:
        """Breakers keep monotonic time; report it as wall-clock ISO-8601."""
        if monotonic_time is None:
            return None
        return iso(time.time() - (time.monotonic() - monotonic_time))

    async def models_status(self, request: web.Request) -> web.Response:
        runtime = self.live.runtime
        router = runtime.router
        threshold = runtime.config.circuit_breaker.latency_threshold
        shed_reason = runtime.shedder.should_shed()
        models: dict[str, Any] = {}
        for name, pool in router.models.items():
            series = runtime.telemetry.models.get(name)
            upstreams = pool.upstreams
            breakers = [u.breaker for u in upstreams]
            open_count = sum(b.state is BreakerState.OPEN for b in breakers)
            models[name] = {
                "health_score": health_score(upstreams, series, threshold),
                "active_requests": sum(u.active for u in upstreams),
                "total_requests": series.requests if series is not None else 0,
                "avg_latency": ms(series.latency.mean()) if series is not None else 0.0,
                "p95_latency": ms(series.latency.percentile(0.95)) if series else 0.0,
                "p99_latency": ms(series.latency.percentile(0.99)) if series else 0.0,
                "avg_ttft": ms(series.ttft.mean()) if series is not None else 0.0,
                "success_rate": round(series.outcomes.success_rate(), 4) if series else 1.0,
                "circuit_open": open_count == len(breakers),
                "tokens": {
                    "prompt": series.prompt_tokens if series else 0,
                    "completion": series.completion_tokens if series else 0,
                },
                "cost": round(series.cost, 6) if series else 0.0,
                "adaptive_breakers": {
                    u.name: {
                        "state": u.breaker.state.value,
                        "failures": u.breaker.failure_count,
                        "slow_requests": u.breaker.slow_requests,
                        "concurrent": u.active,
                    }
                    for u in upstreams
                },
            }
        return json_response(
            {
                "models": models,
                "should_shed_load": shed_reason is not None,
                "shed_reason": shed_reason,
                "timestamp": now_iso(),
            }
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/router/health", self.router_health),
            web.get("/api/v1/router/metrics", self.routing_metrics),
            web.get("/models/status", self.models_status),
            web.get("/v1/admin/models/stats", self.models_status),
            web.get("/dashboard", self.dashboard),
        ]
