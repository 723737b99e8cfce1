"""Round robin: each available backend in turn, skipping those that cannot take a request."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B
from balancers.request import RoutingRequest, StrategySettings


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(
        self,
        backends: Sequence[Any],
        rng: random.Random,
        settings: StrategySettings | None = None,
    ) -> None:
        self._next = 0

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        count = len(backends)
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            backend = backends[index]
            if backend.available() and backend not in exclude:
                self._next = index + 1
                return backend
        return None
