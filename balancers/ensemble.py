"""Ensemble: several strategies vote with configured weights; the backend with the most weight
wins (ties go to the heaviest voter's choice)."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, Balancer
from balancers.request import RoutingRequest, StrategySettings


class Ensemble:
    __slots__ = ("_voters",)
    uses_request = True

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        from balancers.registry import create_balancer  # the registry lists this module too

        settings = settings or StrategySettings()
        voters = sorted(settings.ensemble, key=lambda item: -item[1])
        self._voters: list[tuple[Balancer, float]] = [
            (create_balancer(name, backends, rng, settings), weight)
            for name, weight in voters
            if name != "ensemble"
        ]

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        votes: dict[int, float] = {}
        order: list[B] = []
        for voter, weight in self._voters:
            choice = voter.select(backends, exclude, request)
            if choice is None:
                continue
            if id(choice) not in votes:
                order.append(choice)
            votes[id(choice)] = votes.get(id(choice), 0.0) + weight
        if not order:
            return None
        return max(order, key=lambda backend: votes[id(backend)])
