"""Passive health: what real traffic says about a backend.

Failures seen on the request path (connect errors, timeouts, 5xx, truncated bodies) go to the
backend's circuit breaker (proxy.handler). Latency and outcomes are kept here in fixed-size
structures that cost no allocation per request, for the strategies that route on them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

SAMPLES = 1024  # per ring: enough for a stable p99 of the recent past


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (0.0 for none): rings, merged worker samples
    and the dashboard's history all read it this one way."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class PeakEwma:
    """Peak-sensitive moving average of response time (Finagle / Envoy peak-EWMA): a slower
    sample is taken at once, faster ones pull the average down with decay time `tau`. A
    backend with no samples has no opinion (`value` is None) and is scored neutrally."""

    __slots__ = ("value", "tau", "_stamp", "_clock")

    def __init__(self, tau: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.value: float | None = None
        self.tau = tau
        self._clock = clock
        self._stamp = 0.0

    def observe(self, seconds: float) -> None:
        now = self._clock()
        value = self.value
        if value is None or seconds > value:
            self.value = seconds
        else:
            weight = math.exp(-(now - self._stamp) / self.tau)
            self.value = value * weight + seconds * (1.0 - weight)
        self._stamp = now

    def estimate(self, target: float) -> float:
        """The value, drifting toward `target` while no sample comes in: a backend that was
        slow once is probed again after a while instead of being starved forever."""
        value = self.value
        if value is None:
            return target
        weight = math.exp(-(self._clock() - self._stamp) / self.tau)
        return value * weight + target * (1.0 - weight)

    def reset(self) -> None:
        self.value = None


class LatencyRing:
    """The last SAMPLES values, for mean and percentiles (sorted only when read)."""

    __slots__ = ("values", "next", "count", "_p95", "_p95_at")

    def __init__(self) -> None:
        self.values = [0.0] * SAMPLES
        self.next = 0
        self.count = 0
        self._p95 = 0.0
        self._p95_at = -1.0

    def add(self, value: float) -> None:
        self.values[self.next] = value
        self.next = (self.next + 1) % SAMPLES
        if self.count < SAMPLES:
            self.count += 1

    def mean(self) -> float:
        return sum(self.values[: self.count]) / self.count if self.count else 0.0

    def percentile(self, fraction: float) -> float:
        return percentile(self.values[: self.count], fraction)

    def recent_p95(self, now: float) -> float:
        """p95, recomputed at most once a second: cheap enough to read while routing."""
        if now - self._p95_at >= 1.0:
            self._p95 = self.percentile(0.95)
            self._p95_at = now
        return self._p95


class OutcomeRing:
    """Successes and failures of the last SAMPLES requests."""

    __slots__ = ("ok", "next", "count", "successes")

    def __init__(self) -> None:
        self.ok = [True] * SAMPLES
        self.next = 0
        self.count = 0
        self.successes = 0

    def add(self, ok: bool) -> None:
        if self.count == SAMPLES:
            self.successes -= self.ok[self.next]
        else:
            self.count += 1
        self.ok[self.next] = ok
        self.successes += ok
        self.next = (self.next + 1) % SAMPLES

    def success_rate(self) -> float:
        return self.successes / self.count if self.count else 1.0
