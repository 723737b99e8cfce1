"""Adaptive: each backend gets a 0-100 health score from its recent success rate and breaker
state; it is multiplied by a weighted mix of spare capacity, latency (p95 against the slow
threshold) and success, and the best backend wins. Open circuits are never eligible."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balancers.base import B, Backend, Balancer, best_by
from balancers.registry import register
from balancers.request import RoutingRequest, StrategySettings
from balancers.settings import setting
from circuit.breaker import BreakerState


@dataclass(frozen=True, slots=True)
class AdaptiveWeights:
    """score = health x (load·w + latency·w + error·w)"""

    load: float = setting(0.4, help="adaptive: weight of spare capacity")
    latency: float = setting(0.4, help="adaptive: weight of p95 latency against the slow threshold")
    error: float = setting(0.2, help="adaptive: weight of the recent success rate")


@register("adaptive", order=7)
class Adaptive(Balancer):
    __slots__ = ("_weights", "_slow", "_clock")
    settings_type = AdaptiveWeights
    settings_key = "adaptive_weights"

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        self._weights = settings.of(AdaptiveWeights)
        self._slow = settings.slow_latency
        self._clock = settings.clock

    def score(self, backend: Backend, now: float) -> float:
        success = backend.outcomes.success_rate()
        health = 100.0 * success
        if backend.breaker.state is BreakerState.HALF_OPEN:
            health *= 0.5
        weights = self._weights
        load = 1.0 - backend.active / backend.max_concurrent
        latency = (
            1.0 - min(1.0, backend.latencies.recent_p95(now) / self._slow)
            if backend.latencies.count
            else 0.5  # unmeasured: neutral
        )
        return health * (weights.load * load + weights.latency * latency + weights.error * success)

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        now = self._clock()
        return best_by(candidates, lambda backend: self.score(backend, now), self._rng)
