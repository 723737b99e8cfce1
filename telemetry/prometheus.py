"""Prometheus exposition: every metric declared once, in a registry of the app's own.

Per-request cost is kept to dictionary lookups and additions on plain numbers, turned into
metric families when Prometheus scrapes; everything that is state rather than an event
(in-flight and queued counts, breaker and health state, the gateway's counters) is read at
scrape time too instead of being updated on the request path.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from circuit.breaker import BreakerState
from proxy.runtime import LiveRuntime
from telemetry.histogram import HistogramSeries
from telemetry.outcome import Outcome

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
# How each gauge below merges across workers (cluster.metrics_merge): counts of what is in
# progress add up, a breaker takes its worst state, health its least healthy verdict. A gauge
# left out is exposed per worker (a `worker` label), never summed or averaged, so a
# percentile added here one day cannot be averaged by accident.
GAUGE_MERGE = {
    "router_in_flight": "sum",
    "router_queued": "sum",
    "router_backend_in_flight": "sum",
    "router_breaker_state": "max",
    "router_backend_healthy": "min",
    # prometheus_client's process and platform collectors, one set per worker process (the
    # supervisor's own are not in it): the gateway's memory and descriptors are the workers'
    # sum; the fd limit is per process, so the tightest one is the one that bites; the start
    # time is the oldest worker's (a restarted worker does not make the gateway look new).
    "process_resident_memory_bytes": "sum",
    "process_virtual_memory_bytes": "sum",
    "process_open_fds": "sum",
    "process_max_fds": "min",
    "process_start_time_seconds": "min",
    "python_info": "max",  # 1 in every worker
}


class GatewayCollector(Collector):
    """State read when Prometheus scrapes, so the request path pays nothing for it."""

    def __init__(self, live: LiveRuntime) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        runtime = self.live.runtime
        admission = runtime.admission
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
        for upstream in runtime.router.upstreams:
            breaker.add_metric([upstream.name], BREAKER_VALUES[upstream.breaker.state])
            healthy.add_metric([upstream.name], 1 if upstream.healthy else 0)
            active.add_metric([upstream.name], upstream.active)
        yield breaker
        yield healthy
        yield active
        stats = runtime.stats
        counters = {
            "router_retries": ("Retried attempts", stats.retries),
            "router_failovers": (
                "Requests served by another backend after a failure",
                runtime.telemetry.failovers,
            ),
            "router_fallbacks": ("Requests served by a fallback model", stats.fallbacks),
            "router_stale_resends": (
                "Resends after a stale keep-alive connection",
                stats.stale_retries,
            ),
            "router_client_closed": ("Requests whose client left first (499)", stats.client_closed),
            "router_shed": ("Requests refused by load shedding", runtime.shedder.shed),
            "router_rate_limited": (
                "Requests refused by a rate limit",
                runtime.rate_limiter.limited,
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
                runtime.retry.budget.denied,
            ),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(name, documentation, value=value)
        refused = CounterMetricFamily(
            "router_refused_before_routing",
            "Requests answered with an error before routing (unparseable, no route, wrong"
            " method, body too large, invalid input, unknown model), by status",
            labels=["status"],
        )
        for status, count in sorted(runtime.telemetry.refused.items()):
            refused.add_metric([str(status)], count)
        yield refused


class Histograms:
    """A labelled histogram: one series per label set, made on first use."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.bounds = bounds
        self.series: dict[tuple[str, ...], HistogramSeries] = {}

    def __call__(self, *labels: str) -> HistogramSeries:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = HistogramSeries(self.bounds)
        return series

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, series in self.series.items():
            family.add_metric(list(labels), series.buckets(), series.sum)
        return family


class Counters:
    """A labelled counter: label tuple -> running total."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        return family


class RequestCounts:
    """router_requests_total, keyed on the request path by the status as sent (an int: no
    string is made per request); its `status_class` and `code` labels are written when
    scraped. Only codes the gateway actually sent become series, so the count of series is
    bounded by the routes, backends and codes seen, as in Envoy's and nginx's exporters."""

    name = "router_requests"
    documentation = "Finished requests, by the status code sent to the client"
    labels = ("pool", "backend", "route", "status_class", "code")

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str, int], int] = {}

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for (pool, backend, route, status), value in self.values.items():
            status_class = STATUS_CLASSES.get(status // 100, "other")
            family.add_metric([pool, backend, route, status_class, str(status)], value)
        return family


class RequestMetrics(Collector):
    """What finished requests did, accumulated in plain counters on the request path and turned
    into Prometheus families when scraped. (prometheus_client's own Counter and Histogram take
    a lock per increment: py-spy showed them among the request path's costliest calls.)"""

    def __init__(self) -> None:
        self.requests = RequestCounts()
        self.tokens = Counters(
            "router_tokens", "Tokens reported by backends in `usage`", ("model", "kind")
        )
        # Prices are configured per model without a currency; they are read as US dollars
        # (what OpenAI-style price lists quote), and the unit is in the name as Prometheus
        # asks (https://prometheus.io/docs/practices/naming/#base-units).
        self.cost = Counters(
            "router_cost_dollars", "Cost of served requests, in US dollars", ("model",)
        )
        # Per backend as well as per pool: backends are configured, so the series are bounded
        # (pools x backends they reach x 15 buckets), and a slow replica shows on its own.
        self.duration = Histograms(
            "router_request_duration_seconds",
            "Request duration, last byte included",
            ("pool", "backend"),
            LATENCY_BUCKETS,
        )
        self.ttft = Histograms(
            "router_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ("pool", "backend"),
            LATENCY_BUCKETS,
        )
        self.gap = Histograms(
            "router_inter_token_gap_seconds", "Time between streamed chunks", ("pool",), GAP_BUCKETS
        )
        self.overhead = Histograms(
            "router_gateway_overhead_seconds",
            "Time spent in the gateway, backend excluded",
            (),
            OVERHEAD_BUCKETS,
        )
        self.queue_wait = Histograms(
            "router_queue_wait_seconds",
            "Time spent waiting for a backend slot",
            (),
            LATENCY_BUCKETS,
        )
        self._overhead = self.overhead()
        self._queue_wait = self.queue_wait()

    def observe(self, outcome: Outcome) -> None:
        pool = outcome.pool
        backend = outcome.backend or "none"
        key = (pool, backend, outcome.route, outcome.status)
        requests = self.requests.values
        requests[key] = requests.get(key, 0) + 1
        self.duration(pool, backend).observe(outcome.duration)
        self._overhead.observe(outcome.overhead)
        if outcome.queue_wait > 0.0001:
            self._queue_wait.observe(outcome.queue_wait)
        if outcome.ttft is not None:
            self.ttft(pool, backend).observe(outcome.ttft)
        model = outcome.model
        if model is not None:
            if outcome.prompt_tokens:
                self._add(self.tokens, (model, "prompt"), outcome.prompt_tokens)
            if outcome.completion_tokens:
                self._add(self.tokens, (model, "completion"), outcome.completion_tokens)
            if outcome.cost:
                self._add(self.cost, (model,), outcome.cost)

    @staticmethod
    def _add(counters: Counters, key: tuple[str, ...], amount: float) -> None:
        counters.values[key] = counters.values.get(key, 0) + amount

    def collect(self) -> Iterator[Metric]:
        yield self.requests.family()
        yield self.duration.family()
        yield self.ttft.family()
        yield self.gap.family()
        yield self.overhead.family()
        yield self.queue_wait.family()
        yield self.tokens.family()
        yield self.cost.family()


class PrometheusMetrics:
    def __init__(self, live: LiveRuntime) -> None:
        self.registry = CollectorRegistry()
        self.events = RequestMetrics()
        self.registry.register(self.events)
        self.registry.register(GatewayCollector(live))
        # process_* (CPU, memory, descriptors, start time; read from /proc when scraped) and
        # python_info, on this registry rather than prometheus_client's global one.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.observe = self.events.observe
        self.gap_series = self.events.gap  # a pool's inter-token gap histogram, by its name

    async def handler(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        response = web.Response(body=encoder(self.registry))
        response.headers["Content-Type"] = content_type
        return response
