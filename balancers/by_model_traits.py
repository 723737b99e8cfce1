"""Strategies that choose by the serving model's configured traits: cost, quality, priority
tier, or a weighted balance of cost, live latency, quality and load. Within the chosen model
(or tier), the least loaded replica serves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balancers.base import B, Balancer, best_by, least_loaded
from balancers.latency import neutral_latency
from balancers.registry import register
from balancers.request import RoutingRequest, StrategySettings
from balancers.settings import setting


class _ByKey(Balancer):
    """Least loaded among the eligible backends with the lowest key."""

    __slots__ = ()
    cacheable = True  # the model choice depends only on the request and backend states

    @staticmethod
    def key(backend: Any) -> float:
        raise NotImplementedError

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        lowest = min(self.key(b) for b in candidates)
        return least_loaded([b for b in candidates if self.key(b) == lowest], self._rng)


@register("cost_optimized", order=8)
class CostOptimized(_ByKey):
    cost_aware = True

    @staticmethod
    def key(backend: Any) -> float:
        return float(backend.cost)


@register("quality_optimized", order=9)
class QualityOptimized(_ByKey):
    @staticmethod
    def key(backend: Any) -> float:
        return -float(backend.quality)


@register("priority", order=11)
class Priority(_ByKey):
    """Configured priority order: the next tier only when no backend of a higher one can
    take the request."""

    @staticmethod
    def key(backend: Any) -> float:
        return float(backend.priority)


@dataclass(frozen=True, slots=True)
class BalancedWeights:
    """Each score is normalised to 0-1 across the candidates before weighting."""

    cost: float = setting(0.3, help="balanced: weight of cost (the cheapest scores 1)")
    latency: float = setting(0.3, help="balanced: weight of peak-EWMA latency (the fastest, 1)")
    quality: float = setting(0.3, help="balanced: weight of the model's `quality`")
    load: float = setting(0.1, help="balanced: weight of spare capacity")


@register("balanced", order=10)
class Balanced(Balancer):
    """Weighted score over cost (cheaper is better), live latency, quality and spare capacity,
    each normalised to 0-1 across the candidates."""

    __slots__ = ("_weights",)
    cost_aware = True
    settings_type = BalancedWeights
    settings_key = "balanced_weights"

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        self._weights = settings.of(BalancedWeights)

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        if len(candidates) == 1:
            return candidates[0]
        neutral = neutral_latency(candidates) or 0.0

        def latency_of(backend: B) -> float:
            value = backend.latency.value
            return value if value is not None else neutral

        costs = [b.cost for b in candidates]
        latencies = [latency_of(b) for b in candidates]
        low_cost, high_cost = min(costs), max(costs)
        low_lat, high_lat = min(latencies), max(latencies)
        weights = self._weights

        def score(backend: B) -> float:
            return (
                weights.cost * _inverse(backend.cost, low_cost, high_cost)
                + weights.latency * _inverse(latency_of(backend), low_lat, high_lat)
                + weights.quality * backend.quality
                + weights.load * (1.0 - backend.active / backend.max_concurrent)
            )

        return best_by(candidates, score, self._rng, tolerance=1e-12)


def _inverse(value: float, low: float, high: float) -> float:
    """1 for the lowest value, 0 for the highest."""
    return 1.0 if high == low else (high - value) / (high - low)
