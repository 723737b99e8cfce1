"""Latency: peak-EWMA of time to response headers x (requests in flight + 1), picking by power
of two choices among eligible backends (Envoy's peak-EWMA, nginx's least_time). A backend with
no samples yet is scored at the average of the others: neutral, neither favoured nor shunned.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, eligible
from balancers.request import RoutingRequest, StrategySettings


def neutral_latency(backends: Sequence[Any]) -> float | None:
    known = [b.latency.value for b in backends if b.latency.value is not None]
    return sum(known) / len(known) if known else None


class LatencyAware:
    __slots__ = ("_rng",)

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        self._rng = rng

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        first, second = self._rng.sample(candidates, 2)
        neutral = neutral_latency(candidates)
        if neutral is None:  # nothing measured yet: plain least-loaded of the two
            return second if second.active < first.active else first
        return second if self.cost(second, neutral) < self.cost(first, neutral) else first

    @staticmethod
    def cost(backend: Any, neutral: float) -> float:
        latency = backend.latency.value
        return (neutral if latency is None else latency) * (backend.active + 1)
