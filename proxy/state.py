"""One request's state across its attempts (read by the forwarding loop, the attempt and the
relay)."""

from __future__ import annotations

import time
from typing import Any

from balancers.request import RoutingRequest
from proxy.errors import GatewayError
from proxy.rewrite import ModelTemplate
from proxy.upstream import Pool, Upstream
from proxy.verdict import OK
from telemetry.histogram import HistogramSeries
from telemetry.outcome import Outcome


class RequestState:
    """One request across its attempts: what the route adapter decided (where it may go, the
    body) and what happened so far (attempts, time spent on backends, the outcome)."""

    __slots__ = (
        "request_id",
        "pool",
        "pools",
        "path",
        "body",
        "document",
        "template",
        "stream",
        "routing",
        "started",
        "backend_time",
        "backoff_time",
        "attempt",
        "tried",
        "failed_at",
        "fallback",
        "verdict",
        "error",
        "outcome",
        "usage_chunk",
        "gaps",
    )

    # Called with positional arguments on the request path: keywords cost a dict per call.
    def __init__(
        self,
        request_id: str,
        pool: Pool,
        path: str,
        body: bytes,
        document: dict[str, Any] | None = None,
        template: ModelTemplate | None = None,
        stream: bool = False,
        fallbacks: tuple[Pool, ...] = (),
        route: str | None = None,
        routing: RoutingRequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.pool = pool
        self.pools = (pool, *fallbacks) if fallbacks else (pool,)  # where a retry could go
        self.path = path
        self.body = body
        # The parsed body, kept when a fallback may have to get its own model's name in it,
        # and the body with a hole for that name ("auto": built before anything is taken).
        self.document = document
        self.template = template
        self.stream = stream
        self.routing = routing
        self.started = time.perf_counter()
        self.backend_time = 0.0  # spent waiting on backends: excluded from gateway overhead
        self.backoff_time = 0.0  # spent pausing between retries: shown apart from overhead
        self.attempt = 0
        self.tried: list[Upstream] = []
        self.failed_at: float | None = None
        self.fallback: str | None = None  # the model that served instead of the requested one
        self.verdict = OK  # of the latest attempt
        self.error: GatewayError | None = None  # why the latest attempt got no answer
        self.outcome = Outcome(request_id, route or path, pool.name, stream)
        self.usage_chunk: bytes | None = None  # the stream chunk that carried `usage`
        self.gaps: HistogramSeries | None = None  # the pool's inter-token gap histogram

    def overhead(self) -> float:
        """The gateway's own time: neither the backends' nor the pauses between retries."""
        return time.perf_counter() - self.started - self.backend_time - self.backoff_time
