"""Power of two choices: sample two available backends at random and take the one with fewer
requests in flight (Envoy's least_request with choice_count 2). Nearly as good as a full
least-connections scan, without herding every request onto the same momentary minimum."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, eligible
from balancers.request import RoutingRequest, StrategySettings


class PowerOfTwo:
    __slots__ = ("_rng",)

    def __init__(
        self,
        backends: Sequence[Any],
        rng: random.Random,
        settings: StrategySettings | None = None,
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
        return second if second.active < first.active else first
