"""Uniform random choice among the available backends."""

from __future__ import annotations

from balancers.base import B, Balancer
from balancers.registry import register
from balancers.request import RoutingRequest


@register("random", order=4)
class RandomChoice(Balancer):
    __slots__ = ()

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        return self._rng.choice(candidates)
