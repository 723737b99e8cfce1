"""Least connections: the backend with the fewest requests in flight (streams count until
their last byte); ties are broken at random so equal backends share the load."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B
from balancers.request import RoutingRequest, StrategySettings


class LeastConnections:
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
        least: list[B] = []
        fewest = -1
        for backend in backends:
            if not backend.available() or backend in exclude:
                continue
            active = backend.active
            if fewest < 0 or active < fewest:
                fewest = active
                least = [backend]
            elif active == fewest:
                least.append(backend)
        if not least:
            return None
        return least[0] if len(least) == 1 else self._rng.choice(least)
