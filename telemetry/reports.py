"""Read-only reports in the specified shapes: router health, routing metrics, model status.

Everything here is computed from state the request path already keeps (Upstream counters,
breakers, health verdicts, Telemetry windows) when an endpoint is read, never per request.
Each report is a snapshot of raw figures, with the merge rule of every field declared beside
it, and a render that derives the answer from a snapshot, this worker's or the merged one of
every worker (cluster.merge): percentiles come from the samples, shares from the counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypedDict

from aiohttp import web

from admission.snapshot import AdmissionSnapshot
from circuit.breaker import BreakerState
from circuit.snapshot import BreakerSnapshot
from cluster.merge import MergedReport, Rule, Snapshot
from control.admin import counters, now_iso, upstream_snapshots, view
from health.stats import LatencyRing, percentile
from proxy.runtime import LiveRuntime
from proxy.snapshot import UpstreamSnapshot
from telemetry.history import HISTORY_MERGE, History, render_history
from telemetry.outcome import SeriesStats, iso

HEALTH_WEIGHTS = (0.5, 0.3, 0.2)  # success rate, latency, spare capacity
MODEL_BACKENDS = "models"  # the distribution pool of every model backend
DASHBOARD = Path(__file__).resolve().parent / "static" / "dashboard.html"
# The metrics spec names the breaker's fields its own way; the values are the snapshot's.
METRICS_BREAKER_VIEW = {
    "status": "state",
    "failure_count": "failure_count",
    "last_failure": "last_failure",
    "slow_requests": "slow_requests",
    "trips": "trips",
}


class SeriesSnapshot(TypedDict):
    """One model's recent traffic; annotations are merge rules (cluster.merge)."""

    requests: Annotated[int, "sum"]
    latency: Annotated[list[float], "samples"]  # seconds, the last LatencyRing's worth
    ttft: Annotated[list[float], "samples"]
    successes: Annotated[int, "sum"]  # of the last `outcomes`
    outcomes: Annotated[int, "sum"]
    prompt_tokens: Annotated[int, "sum"]
    completion_tokens: Annotated[int, "sum"]
    cost: Annotated[float, "sum"]


class FailoverSnapshot(TypedDict):
    total: Annotated[int, "sum"]
    successful: Annotated[int, "sum"]
    time_total_s: Annotated[float, "sum"]  # over the successful ones
    last: Annotated[str | None, "latest"]


ACCOUNTING_MERGE = {  # telemetry.accounting.Accountant.state()
    "store": Rule.FIRST,
    "buffered": Rule.SUM,
    "buffer_size": Rule.FIRST,
    "written": Rule.SUM,
    "dropped": Rule.SUM,
    "failed_writes": Rule.SUM,
}
UPSTREAMS_BY_POOL = {"*": {"*": UpstreamSnapshot}}
METRICS_MERGE = {
    "total_requests": Rule.SUM,
    "successful_requests": Rule.SUM,
    "failed_requests": Rule.SUM,
    "by_status": {"*": Rule.SUM},  # status code sent -> routed requests
    "latency": Rule.SAMPLES,
    "ttft": Rule.SAMPLES,
    "overhead": Rule.SAMPLES,
    "requests_per_second": Rule.SUM,
    "admission": AdmissionSnapshot,
    "strategy": Rule.FIRST,
    "backends": {"*": UpstreamSnapshot},
    "failovers": FailoverSnapshot,
    "refused_before_routing": {"*": Rule.SUM},  # status -> requests
    "counters": {"*": Rule.SUM},  # every counter adds up
    "accounting": ACCOUNTING_MERGE,
}
HEALTH_MERGE = {"pools": UPSTREAMS_BY_POOL, "pools_failing_open": Rule.UNION}
MODELS_MERGE = {
    "models": {"*": {"series": SeriesSnapshot, "backends": {"*": UpstreamSnapshot}}},
    "latency_threshold": Rule.FIRST,
    "should_shed_load": Rule.ANY,
    "shed_reason": Rule.FIRST,
}


def samples(ring: LatencyRing) -> list[float]:
    return ring.values[: ring.count]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def backend_status(upstream: UpstreamSnapshot) -> str:
    if upstream["breaker"]["state"] == BreakerState.OPEN:
        return "circuit_open"
    return "healthy" if upstream["healthy"] else "unhealthy"


def series_snapshot(series: SeriesStats | None) -> SeriesSnapshot:
    if series is None:
        series = SeriesStats()
    return {
        "requests": series.requests,
        "latency": samples(series.latency),
        "ttft": samples(series.ttft),
        "successes": series.outcomes.successes,
        "outcomes": series.outcomes.count,
        "prompt_tokens": series.prompt_tokens,
        "completion_tokens": series.completion_tokens,
        "cost": series.cost,
    }


def success_rate(series: SeriesSnapshot) -> float:
    return series["successes"] / series["outcomes"] if series["outcomes"] else 1.0


def health_score(
    backends: Sequence[UpstreamSnapshot], series: SeriesSnapshot, latency_threshold: float
) -> float:
    """0-100 from recent success rate, p95 latency against the slow threshold, and load;
    0 when every backend's circuit is open or every backend is unhealthy."""
    if not backends or all(backend_status(b) != "healthy" for b in backends):
        return 0.0
    p95 = percentile(series["latency"], 0.95)
    latency = 1.0 if p95 <= latency_threshold else latency_threshold / p95
    capacity = sum(b["max_concurrent"] for b in backends)
    load = sum(b["active"] for b in backends) / capacity if capacity else 1.0
    w_success, w_latency, w_load = HEALTH_WEIGHTS
    return round(
        100 * (w_success * success_rate(series) + w_latency * latency + w_load * (1 - load)), 1
    )


def render_health(snapshot: Snapshot) -> dict[str, Any]:
    status: dict[str, dict[str, Any]] = {}
    for pool, backends in snapshot["pools"].items():
        status[pool] = {
            name: {
                "status": backend_status(u),
                "response_time_ms": u["response_time_ms"],
                "last_check": u["last_check"],
                "circuit_breaker": u["breaker"]["state"],
                "active_requests": u["active"],
            }
            for name, u in backends.items()
        }
    states = [b["status"] for backends in status.values() for b in backends.values()]
    total, healthy = len(states), states.count("healthy")
    return {
        "health_status": status,
        "overall_health": "healthy" if healthy == total else "degraded" if healthy else "unhealthy",
        "total_backends": total,
        "healthy_backends": healthy,
        "unhealthy_backends": total - healthy,
        "pools_failing_open": snapshot["pools_failing_open"],
        "timestamp": now_iso(),
    }


def distribution_pool(upstream: UpstreamSnapshot) -> str:
    """The backends a strategy balances among, whose shares are compared with each other:
    every model backend (a request that leaves the model open chooses among all of them),
    the qdrant pool, the embedding pool."""
    return MODEL_BACKENDS if upstream["model"] is not None else upstream["pool"]


def variance(values: Sequence[float]) -> float:
    average = mean(values)
    return mean([(value - average) ** 2 for value in values])


def render_distribution(backends: dict[str, UpstreamSnapshot], strategy: str) -> dict[str, Any]:
    """Each backend's share of its own pool's requests, and how evenly each pool is spread
    (the variance of its shares, in percentage points squared: 0.0 for a perfect split).
    `distribution_variance` is the pools' variances weighted by their requests, so traffic
    on one pool is not compared with the backends of another."""
    pools: dict[str, dict[str, int]] = {}
    for name, upstream in backends.items():
        pools.setdefault(distribution_pool(upstream), {})[name] = upstream["requests"]
    shares: dict[str, float] = {}
    per_pool: dict[str, dict[str, Any]] = {}
    weighted = 0.0
    for pool, served in pools.items():
        total = sum(served.values())
        for name, count in served.items():
            shares[name] = count / total * 100 if total else 0.0
        spread = variance([shares[name] for name in served]) if total else 0.0
        weighted += spread * total
        per_pool[pool] = {
            "backends": list(served),
            "requests": total,
            "distribution_variance": round(spread, 4),
        }
    routed = sum(pool["requests"] for pool in per_pool.values())
    return {
        "strategy": strategy,
        "backend_distribution": {
            name: {"requests": u["requests"], "percentage": round(shares[name], 2)}
            for name, u in backends.items()
        },
        "distribution_variance": round(weighted / routed, 4) if routed else 0.0,
        "pools": per_pool,
    }


def render_metrics(snapshot: Snapshot) -> dict[str, Any]:
    backends: dict[str, UpstreamSnapshot] = snapshot["backends"]
    refused: dict[str, int] = snapshot["refused_before_routing"]
    successful = snapshot["successful_requests"]
    finished = successful + snapshot["failed_requests"]
    failovers: FailoverSnapshot = snapshot["failovers"]
    latency = snapshot["latency"]
    admission: AdmissionSnapshot = snapshot["admission"]
    return {
        "routing_metrics": {
            "total_requests": snapshot["total_requests"],
            "successful_requests": successful,
            "failed_requests": snapshot["failed_requests"],
            "success_rate": round(successful / finished, 4) if finished else 1.0,
            "avg_response_time_ms": ms(mean(latency)),
            "p50_response_time_ms": ms(percentile(latency, 0.5)),
            "p99_response_time_ms": ms(percentile(latency, 0.99)),
            "avg_ttft_ms": ms(mean(snapshot["ttft"])),
            "avg_gateway_overhead_ms": ms(mean(snapshot["overhead"])),
            "requests_per_second": round(snapshot["requests_per_second"], 3),
            "by_status": dict(sorted(snapshot["by_status"].items())),
            "in_flight": admission["in_flight"],
            "queued": admission["queued"],
        },
        "load_balancing": render_distribution(backends, snapshot["strategy"]),
        "circuit_breakers": {
            name: view(u["breaker"], METRICS_BREAKER_VIEW) for name, u in backends.items()
        },
        "failover_events": {
            "total_failovers": failovers["total"],
            "successful_failovers": failovers["successful"],
            "avg_failover_time_ms": ms(failovers["time_total_s"] / failovers["successful"])
            if failovers["successful"]
            else 0.0,
            "last_failover": failovers["last"],
        },
        "refused_before_routing": {"total": sum(refused.values()), "by_status": refused},
        "counters": snapshot["counters"],
        "accounting": snapshot["accounting"],
    }


def adaptive_breaker(upstream: UpstreamSnapshot) -> dict[str, Any]:
    """The model status spec's names for a backend's breaker and load."""
    breaker: BreakerSnapshot = upstream["breaker"]
    return {
        "state": breaker["state"],
        "failures": breaker["failure_count"],
        "slow_requests": breaker["slow_requests"],
        "concurrent": upstream["active"],
    }


def render_model(model: dict[str, Any], latency_threshold: float) -> dict[str, Any]:
    series: SeriesSnapshot = model["series"]
    backends: dict[str, UpstreamSnapshot] = model["backends"]
    latency = series["latency"]
    return {
        "health_score": health_score(list(backends.values()), series, latency_threshold),
        "active_requests": sum(u["active"] for u in backends.values()),
        "total_requests": series["requests"],
        "avg_latency": ms(mean(latency)),
        "p95_latency": ms(percentile(latency, 0.95)),
        "p99_latency": ms(percentile(latency, 0.99)),
        "avg_ttft": ms(mean(series["ttft"])),
        "success_rate": round(success_rate(series), 4),
        "circuit_open": all(u["breaker"]["state"] == BreakerState.OPEN for u in backends.values()),
        "tokens": {"prompt": series["prompt_tokens"], "completion": series["completion_tokens"]},
        "cost": round(series["cost"], 6),
        "adaptive_breakers": {name: adaptive_breaker(u) for name, u in backends.items()},
    }


def render_models(snapshot: Snapshot) -> dict[str, Any]:
    threshold = snapshot["latency_threshold"]
    return {
        "models": {
            name: render_model(model, threshold) for name, model in snapshot["models"].items()
        },
        "should_shed_load": snapshot["should_shed_load"],
        "shed_reason": snapshot["shed_reason"],
        "timestamp": now_iso(),
    }


class Reports:
    def __init__(self, live: LiveRuntime) -> None:
        self.live = live
        self.dashboard_page = DASHBOARD.read_bytes()
        self.health = MergedReport(self.health_snapshot, render_health, HEALTH_MERGE)
        self.metrics = MergedReport(self.metrics_snapshot, render_metrics, METRICS_MERGE)
        self.models = MergedReport(self.models_snapshot, render_models, MODELS_MERGE)
        # The dashboard's history is sampled while the app runs (`sampling`), whether or not
        # a page is open.
        self.history = History(live)
        self.history_report = MergedReport(self.history.snapshot, render_history, HISTORY_MERGE)

    async def sampling(self, app: web.Application) -> AsyncIterator[None]:
        """For the app's cleanup context: the history's timer runs from start-up to cleanup."""
        self.history.start()
        yield
        self.history.stop()

    async def dashboard(self, request: web.Request) -> web.Response:
        """A self-contained page (no CDN: inline script and canvas charts) that reads only the
        JSON endpoints and switches strategy through the admin API."""
        return web.Response(body=self.dashboard_page, content_type="text/html", charset="utf-8")

    def health_snapshot(self) -> Snapshot:
        pools = self.live.runtime.router.home_pools()
        return {
            "pools": upstream_snapshots(pools),
            "pools_failing_open": [p.name for p in pools if p.failing_open],
        }

    def metrics_snapshot(self) -> Snapshot:
        runtime = self.live.runtime
        telemetry = runtime.telemetry
        return {
            "total_requests": telemetry.total,
            "successful_requests": telemetry.successful,
            "failed_requests": telemetry.failed,
            "by_status": {str(status): count for status, count in telemetry.statuses.items()},
            "latency": samples(telemetry.latency),
            "ttft": samples(telemetry.ttft),
            "overhead": samples(telemetry.overhead),
            "requests_per_second": telemetry.rate.per_second(),
            "admission": runtime.admission.snapshot(),
            "strategy": runtime.router.strategy,
            "backends": {u.name: u.snapshot() for u in runtime.router.upstreams},
            "failovers": {
                "total": telemetry.failovers,
                "successful": telemetry.successful_failovers,
                "time_total_s": telemetry.failover_time_total,
                "last": iso(telemetry.last_failover),
            },
            "refused_before_routing": {
                str(status): count for status, count in sorted(telemetry.refused.items())
            },
            "counters": counters(runtime),
            "accounting": runtime.accountant.state() if runtime.accountant else None,
        }

    def models_snapshot(self) -> Snapshot:
        runtime = self.live.runtime
        models = runtime.telemetry.models
        shed_reason = runtime.shedder.should_shed()
        return {
            "models": {
                name: {
                    "series": series_snapshot(models.get(name)),
                    "backends": {u.name: u.snapshot() for u in pool.upstreams},
                }
                for name, pool in runtime.router.models.items()
            },
            "latency_threshold": runtime.config.circuit_breaker.latency_threshold,
            "should_shed_load": shed_reason is not None,
            "shed_reason": shed_reason,
        }

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/router/health", self.health.handle),
            web.get("/api/v1/router/metrics", self.metrics.handle),
            web.get("/api/v1/router/history", self.history_report.handle),
            web.get("/models/status", self.models.handle),
            web.get("/v1/admin/models/stats", self.models.handle),
        ]

    def page_routes(self) -> list[web.RouteDef]:
        """The dashboard's page: it holds no state, it reads the routes above."""
        return [web.get("/dashboard", self.dashboard)]
