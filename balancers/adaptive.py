"""Adaptive: each backend gets a 0-100 health score from its recent success rate and breaker
state; it is multiplied by a weighted mix of spare capacity, latency (p95 against the slow
threshold) and success, and the best backend wins. Open circuits are never eligible."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, eligible
from balancers.request import RoutingRequest, StrategySettings
from circuit.breaker import BreakerState


class Adaptive:
    __slots__ = ("_rng", "_weights", "_slow", "_clock")

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        settings = settings or StrategySettings()
        self._rng = rng
        self._weights = settings.adaptive_weights
        self._slow = settings.slow_latency
        self._clock = settings.clock

    def score(self, backend: Any, now: float) -> float:
        success = backend.outcomes.success_rate()
        health = 100.0 * success
        if backend.breaker.state is BreakerState.HALF_OPEN:
            health *= 0.5
        w_load, w_latency, w_error = self._weights
        load = 1.0 - backend.active / backend.max_concurrent
        latency = (
            1.0 - min(1.0, backend.latencies.recent_p95(now) / self._slow)
            if backend.latencies.count
            else 0.5  # unmeasured: neutral
        )
        return health * (w_load * load + w_latency * latency + w_error * success)

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        now = self._clock()
        best: list[B] = []
        top = -1.0
        for backend in eligible(backends, exclude):
            score = self.score(backend, now)
            if score > top:
                top, best = score, [backend]
            elif score == top:
                best.append(backend)
        if not best:
            return None
        return best[0] if len(best) == 1 else self._rng.choice(best)
