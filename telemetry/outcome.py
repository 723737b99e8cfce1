"""What happened to each request, kept in small rolling windows for the JSON endpoints.

The request path builds one `Outcome` per request and hands it to `Telemetry.record`, which
updates plain counters and fixed-size rings (no allocation beyond the outcome itself) and passes
the outcome on to the Prometheus metrics and the SQL accounting buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from circuit.breaker import iso_utc
from config.schema import ModelConfig
from health.stats import LatencyRing, OutcomeRing

RATE_BUCKETS = 60  # one per second
RATE_WINDOW = 10  # seconds behind requests_per_second


iso = iso_utc  # the one ISO-8601 form reports and logs use (circuit.breaker)


class Outcome:
    """One finished request, as the client saw it."""

    __slots__ = (
        "request_id",
        "started",
        "route",
        "pool",
        "model",
        "backend",
        "status",
        "verdict",
        "stream",
        "duration",
        "ttft",
        "overhead",
        "queue_wait",
        "attempts",
        "fallback",
        "failover_time",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "request",
        "error_code",
    )

    def __init__(self, request_id: str, route: str, pool: str, stream: bool) -> None:
        self.request_id = request_id
        self.started = time.time()
        self.route = route
        self.pool = pool
        self.model: str | None = None
        self.backend: str | None = None
        self.status = 0
        self.verdict = 0  # proxy.verdict: what the client got, as one verdict
        self.stream = stream
        self.duration = 0.0
        self.ttft: float | None = None
        self.overhead = 0.0
        self.queue_wait = 0.0
        self.attempts = 0
        self.fallback = False
        self.failover_time: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0
        # The client's request, kept by reference (one store on the request path): the access
        # log reads the peer, method, headers and byte counts from it, only when it is on.
        self.request: web.Request | None = None
        self.error_code: str | None = None  # the gateway's own error answer: its JSON `code`


class RateCounter:
    """Requests per second over the last RATE_WINDOW seconds, from per-second buckets."""

    __slots__ = ("buckets", "second", "started", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = [0] * RATE_BUCKETS
        self._clock = clock
        self.started = clock()
        self.second = int(self.started)

    def _advance(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            for step in range(min(second - self.second, RATE_BUCKETS)):
                self.buckets[(self.second + 1 + step) % RATE_BUCKETS] = 0
            self.second = second

    def add(self) -> None:
        self._advance(self._clock())
        self.buckets[self.second % RATE_BUCKETS] += 1

    def per_second(self) -> float:
        """Over the last RATE_WINDOW seconds, the current one included for the part of it
        that has passed (40 requests sent within one second read as 40/s at once, not 0.0);
        a gateway up for less than the window averages over its uptime, at least a second."""
        now = self._clock()
        self._advance(now)
        window_start = self.second - (RATE_WINDOW - 1)
        first = max(window_start, int(self.started))
        span = max(1.0, now - max(float(window_start), self.started))
        return sum(self.buckets[s % RATE_BUCKETS] for s in range(first, self.second + 1)) / span


class SeriesStats:
    """Rolling figures for one backend or one model."""

    __slots__ = (
        "requests",
        "latency",
        "ttft",
        "outcomes",
        "prompt_tokens",
        "completion_tokens",
        "cost",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.latency = LatencyRing()
        self.ttft = LatencyRing()
        self.outcomes = OutcomeRing()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0

    def add(self, outcome: Outcome, ok: bool) -> None:
        self.requests += 1
        self.latency.add(outcome.duration)
        if outcome.ttft is not None:
            self.ttft.add(outcome.ttft)
        self.outcomes.add(ok)
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens
        self.cost += outcome.cost


class Telemetry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self.successful = 0
        self.failed = 0
        self.latency = LatencyRing()
        self.ttft = LatencyRing()
        self.overhead = LatencyRing()
        self.rate = RateCounter(clock)
        self.backends: dict[str, SeriesStats] = {}
        self.models: dict[str, SeriesStats] = {}
        self.cost_total = 0.0
        self.failovers = 0
        self.successful_failovers = 0
        self.failover_time_total = 0.0
        self.last_failover: float | None = None
        # Requests answered with an error before any routing (unparseable, no route, wrong
        # method, body too large, invalid input, unknown model): status -> count. They never
        # become an Outcome, so they are counted here.
        self.refused: dict[int, int] = {}
        self.statuses: dict[int, int] = {}  # routed requests: status sent -> count
        self.sinks: list[Callable[[Outcome], None]] = []  # Prometheus, accounting, access log

    def record(self, outcome: Outcome, ok: bool) -> None:
        """`ok`: the request's verdict was OK (the caller classifies; telemetry only counts)."""
        self.total += 1
        if ok:
            self.successful += 1
        else:
            self.failed += 1
        self.rate.add()
        statuses = self.statuses
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        self.cost_total += outcome.cost
        self.latency.add(outcome.duration)
        self.overhead.add(outcome.overhead)
        if outcome.ttft is not None:
            self.ttft.add(outcome.ttft)
        if outcome.backend is not None:
            series = self.backends.get(outcome.backend)
            if series is None:
                series = self.backends[outcome.backend] = SeriesStats()
            series.add(outcome, ok)
        if outcome.model is not None:
            series = self.models.get(outcome.model)
            if series is None:
                series = self.models[outcome.model] = SeriesStats()
            series.add(outcome, ok)
        if outcome.failover_time is not None:
            self.failovers += 1
            self.last_failover = outcome.started
            if ok:
                self.successful_failovers += 1
                self.failover_time_total += outcome.failover_time
        for sink in self.sinks:
            sink(outcome)

    def refused_before_routing(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


def price(model: ModelConfig, requests: int, prompt_tokens: int, completion_tokens: int) -> float:
    """What `requests` requests with these token counts cost on `model`."""
    return (
        model.cost_per_request * requests
        + (
            prompt_tokens * model.cost_per_1k_prompt_tokens
            + completion_tokens * model.cost_per_1k_completion_tokens
        )
        / 1000
    )


def usage_from_body(payload: bytes) -> Any:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return document.get("usage") if isinstance(document, dict) else None


def usage_from_stream(chunk: bytes) -> Any:
    """`usage` from the SSE event in `chunk` that carries it (the final chunk of a stream
    with stream_options.include_usage)."""
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: ") and b'"usage"' in line:
            usage = usage_from_body(line[6:])
            if usage is not None:
                return usage
    return None


def account_usage(outcome: Outcome, usage: Any) -> None:
    """Token counts from an OpenAI `usage` object, when it has them."""
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        outcome.prompt_tokens = prompt if isinstance(prompt, int) else 0
        outcome.completion_tokens = completion if isinstance(completion, int) else 0
