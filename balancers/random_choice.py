"""Uniform random choice among the available backends."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancers.base import B, RandomizedBalancer, eligible
from balancers.request import RoutingRequest


class RandomChoice(RandomizedBalancer):
    __slots__ = ()

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        return self._rng.choice(candidates) if candidates else None
