"""Specialization: classify the request (explicit type, else cheap content rules) and send it
to a model configured for that kind of work; the least loaded such backend serves. A request no
model specializes in goes to the least loaded backend of all."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, eligible, least_loaded
from balancers.classify import DEFAULT_SPECIALIZATIONS, classify
from balancers.request import RoutingRequest, StrategySettings


class Specialization:
    __slots__ = ("_rng", "_names", "last_category")
    uses_request = True
    cacheable = True

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        self._rng = rng
        overrides = (settings or StrategySettings()).specializations
        self._names = {
            category: frozenset(overrides.get(category, names))
            for category, names in DEFAULT_SPECIALIZATIONS.items()
        }
        self.last_category: str | None = None

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        if request is None:
            self.last_category = None
            return least_loaded(candidates, self._rng)
        category = self.last_category = classify(request)
        names = self._names.get(category, frozenset())
        matching = [b for b in candidates if b.specializations & names]
        return least_loaded(matching or candidates, self._rng)
