"""Strategy name -> balancer factory, for config validation and the runtime swap."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from balancers.base import Balancer, BalancerFactory
from balancers.least_connections import LeastConnections
from balancers.power_of_two import PowerOfTwo
from balancers.random_choice import RandomChoice
from balancers.round_robin import RoundRobin
from balancers.weighted import SmoothWeighted

STRATEGIES: dict[str, BalancerFactory] = {
    "round_robin": RoundRobin,
    "weighted": SmoothWeighted,
    "weighted_round_robin": SmoothWeighted,
    "least_connections": LeastConnections,
    "random": RandomChoice,
    "power_of_two": PowerOfTwo,
}


class UnknownStrategyError(ValueError):
    def __init__(self, name: object) -> None:
        super().__init__(
            f"unknown strategy {name!r}; valid strategies: {', '.join(strategy_names())}"
        )
        self.name = name


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def create_balancer(name: str, backends: Sequence[Any], rng: random.Random) -> Balancer:
    factory = STRATEGIES.get(name)
    if factory is None:
        raise UnknownStrategyError(name)
    return factory(backends, rng)
