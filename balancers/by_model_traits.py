"""Strategies that choose by the serving model's configured traits: cost, quality, priority
tier, or a weighted balance of cost, live latency, quality and load. Within the chosen model
(or tier), the least loaded replica serves."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, RandomizedBalancer, eligible, least_loaded
from balancers.latency import neutral_latency
from balancers.request import RoutingRequest, StrategySettings


class _ByKey(RandomizedBalancer):
    """Least loaded among the eligible backends with the lowest key."""

    __slots__ = ()
    cacheable = True  # the model choice depends only on the request and backend states

    @staticmethod
    def key(backend: Any) -> float:
        raise NotImplementedError

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        if not candidates:
            return None
        lowest = min(self.key(b) for b in candidates)
        return least_loaded([b for b in candidates if self.key(b) == lowest], self._rng)


class CostOptimized(_ByKey):
    @staticmethod
    def key(backend: Any) -> float:
        return float(backend.cost)


class QualityOptimized(_ByKey):
    @staticmethod
    def key(backend: Any) -> float:
        return -float(backend.quality)


class Priority(_ByKey):
    """Configured priority order: the next tier only when no backend of a higher one can
    take the request."""

    @staticmethod
    def key(backend: Any) -> float:
        return float(backend.priority)


class Balanced:
    """Weighted score over cost (cheaper is better), live latency, quality and spare capacity,
    each normalised to 0-1 across the candidates."""

    __slots__ = ("_rng", "_weights")

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        self._rng = rng
        self._weights = (settings or StrategySettings()).balanced_weights

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        costs = [b.cost for b in candidates]
        neutral = neutral_latency(candidates) or 0.0
        latencies = [
            b.latency.value if b.latency.value is not None else neutral for b in candidates
        ]
        low_cost, high_cost = min(costs), max(costs)
        low_lat, high_lat = min(latencies), max(latencies)
        w_cost, w_latency, w_quality, w_load = self._weights
        best: list[B] = []
        top = -1.0
        for backend, cost, latency in zip(candidates, costs, latencies, strict=True):
            score = (
                w_cost * _inverse(cost, low_cost, high_cost)
                + w_latency * _inverse(latency, low_lat, high_lat)
                + w_quality * backend.quality
                + w_load * (1.0 - backend.active / backend.max_concurrent)
            )
            if score > top + 1e-12:
                top, best = score, [backend]
            elif abs(score - top) <= 1e-12:
                best.append(backend)
        return best[0] if len(best) == 1 else self._rng.choice(best)


def _inverse(value: float, low: float, high: float) -> float:
    """1 for the lowest value, 0 for the highest."""
    return 1.0 if high == low else (high - value) / (high - low)
