"""Smooth weighted round robin, as nginx does it (ngx_http_upstream_get_peer).

Every pick adds each eligible backend's weight to its current weight, takes the largest, and
subtracts the total from the winner. Over a cycle of sum(weights) picks each backend gets exactly
its weight, interleaved rather than in bursts. Weights are scaled to integers once so that float
rounding cannot drift the cycle (the algorithm is invariant under scaling).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, Balancer, OptionalRequest
from balancers.registry import register
from balancers.request import StrategySettings

WEIGHT_SCALE = 1000


@register("weighted", order=2, aliases=("weighted_round_robin",))
class SmoothWeighted(Balancer):
    """Current weights are kept per position in the pool, so this policy sees the whole pool."""

    __slots__ = ("_weights", "_current")

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        self._weights = [max(1, round(b.weight * WEIGHT_SCALE)) for b in backends]
        self._current = [0] * len(backends)

    def select(
        self, backends: Sequence[B], exclude: Collection[B] = (), request: OptionalRequest = None
    ) -> B | None:
        current = self._current
        weights = self._weights
        total = 0
        best = -1
        for index, backend in enumerate(backends):
            if not backend.available() or backend in exclude:
                continue
            weight = weights[index]
            current[index] += weight
            total += weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return None
        current[best] -= total
        return backends[best]
