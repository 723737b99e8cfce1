"""Uniform random choice among the available backends."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, eligible
from balancers.request import RoutingRequest, StrategySettings


class RandomChoice:
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
        return self._rng.choice(candidates) if candidates else None
