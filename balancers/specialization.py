"""Specialization: classify the request (explicit type, else cheap content rules) and send it
to a model configured for that kind of work; the least loaded such backend serves. A request no
model specializes in goes to the least loaded backend of all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from balancers.base import B, Balancer, least_loaded
from balancers.classify import DEFAULT_SPECIALIZATIONS, classify
from balancers.registry import register
from balancers.request import RoutingRequest, StrategySettings

# Category -> the model specializations that serve it.
SERVES = {category: frozenset(names) for category, names in DEFAULT_SPECIALIZATIONS.items()}


@register("specialization", order=12)
class Specialization(Balancer):
    __slots__ = ("last_category",)
    uses_request = True
    cacheable = True

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        self.last_category: str | None = None  # for the decision API's reasoning

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        if request is None:
            self.last_category = None
            return least_loaded(candidates, self._rng)
        category = self.last_category = classify(request)
        names = SERVES.get(category, frozenset())
        matching = [b for b in candidates if b.specializations & names]
        return least_loaded(matching or candidates, self._rng)
