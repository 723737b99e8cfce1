"""Prometheus exposition: every metric declared once, in a registry of the app's own.

Per-request cost is kept to dictionary lookups and increments: label children are bound once
per label set and cached, and everything that is state rather than an event (in-flight and
queued counts, breaker and health state, the gateway's counters) is read at scrape time by a
collector instead of being updated on the request path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from circuit.breaker import BreakerState
from proxy.handler import Gateway
from proxy.telemetry import Outcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class GatewayCollector(Collector):
    """State read when Prometheus scrapes, so the request path pays nothing for it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self.gateway
        admission = gateway.admission
        yield GaugeMetricFamily("router_in_flight", "Requests in flight", value=admission.in_flight)
        yield GaugeMetricFamily(
            "router_queued", "Requests waiting in the queue", value=admission.queued
        )
        breaker = GaugeMetricFamily(
            "router_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["backend"],
        )
        healthy = GaugeMetricFamily(
            "router_backend_healthy", "Active health check verdict (1 healthy)", labels=["backend"]
        )
        active = GaugeMetricFamily(
            "router_backend_in_flight", "Requests in flight per backend", labels=["backend"]
        )
        for upstream in gateway.router.upstreams:
            breaker.add_metric([upstream.name], BREAKER_VALUES[upstream.breaker.state])
            healthy.add_metric([upstream.name], 1 if upstream.healthy else 0)
            active.add_metric([upstream.name], upstream.active)
        yield breaker
        yield healthy
        yield active
        stats = gateway.stats
        counters = {
            "router_retries": ("Retried attempts", stats.retries),
            "router_failovers": (
                "Requests served by another backend after a failure",
                stats.failovers,
            ),
            "router_fallbacks": ("Requests served by a fallback model", stats.fallbacks),
            "router_stale_resends": (
                "Resends after a stale keep-alive connection",
                stats.stale_retries,
            ),
            "router_client_closed": ("Requests whose client left first (499)", stats.client_closed),
            "router_shed": ("Requests refused by load shedding", gateway.shedder.shed),
            "router_rate_limited": (
                "Requests refused by a rate limit",
                gateway.rate_limiter.limited,
            ),
            "router_queue_rejected": (
                "Requests refused with the queue full",
                admission.rejected_full,
            ),
            "router_queue_timeouts": (
                "Requests that waited past the queue timeout",
                admission.timed_out,
            ),
            "router_retry_budget_denied": (
                "Retries refused by the retry budget",
                gateway.retry.budget.denied,
            ),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(name, documentation, value=value)


class PrometheusMetrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "router_requests",
            "Finished requests",
            ["pool", "backend", "route", "status_class"],
            registry=registry,
        )
        self.duration = Histogram(
            "router_request_duration_seconds",
            "Request duration, last byte included",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "router_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gap = Histogram(
            "router_inter_token_gap_seconds",
            "Time between streamed chunks",
            ["pool"],
            buckets=GAP_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "router_gateway_overhead_seconds",
            "Time spent in the gateway, backend excluded",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "router_queue_wait_seconds",
            "Time spent waiting for a backend slot",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "router_tokens",
            "Tokens reported by backends in `usage`",
            ["model", "kind"],
            registry=registry,
        )
        self.cost = Counter("router_cost", "Cost of served requests", ["model"], registry=registry)
        registry.register(GatewayCollector(gateway))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def gap_observer(self, pool: str) -> Any:
        return self._child(self.gap, pool).observe

    def observe(self, outcome: Outcome) -> None:
        status_class = STATUS_CLASSES.get(outcome.status // 100, "other")
        backend = outcome.backend or "none"
        self._child(self.requests, outcome.pool, backend, outcome.route, status_class).inc()
        self._child(self.duration, outcome.pool).observe(outcome.duration)
        self._child(self.overhead).observe(outcome.overhead)
        if outcome.queue_wait > 0.0001:
            self._child(self.queue_wait).observe(outcome.queue_wait)
        if outcome.ttft is not None:
            self._child(self.ttft, outcome.pool).observe(outcome.ttft)
        model = outcome.model
        if model is not None:
            if outcome.prompt_tokens:
                self._child(self.tokens, model, "prompt").inc(outcome.prompt_tokens)
            if outcome.completion_tokens:
                self._child(self.tokens, model, "completion").inc(outcome.completion_tokens)
            if outcome.cost:
                self._child(self.cost, model).inc(outcome.cost)

    async def handler(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(self.registry))
        response.headers["Content-Type"] = content_type
        return response
