"""Load shedding: refuse early, with 503 + Retry-After, when taking more work would only make
things worse. Three signals, each cheap to read on the request path:

- requests in flight + queued above `max_pending`;
- fewer than `min_healthy_backends` healthy backends in the whole gateway;
- the share of client-visible server faults (proxy.verdict.SERVER_FAULTS, not counting shed
  requests) over a sliding window above `max_failure_rate`, once the window has
  `min_requests` outcomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from admission.queue import Admission
from config.schema import LoadSheddingConfig
from proxy.errors import Shed
from proxy.router import Router
from proxy.verdict import SERVER_FAULTS, Verdict


class LoadShedder:
    __slots__ = (
        "config",
        "admission",
        "router",
        "max_pending",
        "shed",
        "reason",
        "requests",
        "failures",
        "_previous",
        "_started",
        "_clock",
    )

    def __init__(
        self,
        config: LoadSheddingConfig,
        admission: Admission,
        router: Router,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.admission = admission
        self.router = router
        self.max_pending = config.max_pending or (admission.max_in_flight + admission.queue_size)
        self.shed = 0
        self.reason: str | None = None
        self.requests = 0
        self.failures = 0
        self._previous = (0, 0)
        self._clock = clock
        self._started = clock()

    def reconfigure(self, config: LoadSheddingConfig, router: Router) -> None:
        """A reload's settings and router; the failure window and the counters carry over."""
        self.config = config
        self.router = router
        admission = self.admission
        self.max_pending = config.max_pending or (admission.max_in_flight + admission.queue_size)

    def record(self, verdict: Verdict) -> None:
        """A finished request's verdict as the client saw it (not one this shedder refused)."""
        self.requests += 1
        if verdict in SERVER_FAULTS:
            self.failures += 1

    def failure_rate(self) -> float:
        now = self._clock()
        window = self.config.failure_window
        elapsed = now - self._started
        if elapsed >= window:
            recent = elapsed < 2 * window
            self._previous = (self.requests, self.failures) if recent else (0, 0)
            self.requests = self.failures = 0
            self._started = now
        requests = self.requests + self._previous[0]
        if requests < self.config.min_requests:
            return 0.0
        return (self.failures + self._previous[1]) / requests

    def should_shed(self) -> str | None:
        """Why new requests should be refused now, or None."""
        if not self.config.enabled:
            return None
        admission = self.admission
        if admission.in_flight + admission.queued >= self.max_pending:
            return f"{admission.in_flight + admission.queued} requests pending"
        minimum = self.config.min_healthy_backends
        if minimum and sum(u.healthy for u in self.router.upstreams) < minimum:
            return f"fewer than {minimum} healthy backends"
        rate = self.failure_rate()
        if rate > self.config.max_failure_rate:
            return f"failure rate {rate:.0%} over the last {self.config.failure_window:g}s"
        return None

    def check(self) -> None:
        reason = self.should_shed()
        self.reason = reason
        if reason is not None:
            self.shed += 1
            raise Shed(
                f"the gateway is shedding load ({reason}); retry later",
                headers={"Retry-After": str(self.admission.retry_after())},
            )
