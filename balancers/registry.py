"""Strategy name -> balancer factory, for config validation and the runtime swap."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from balancers.adaptive import Adaptive
from balancers.base import Balancer, BalancerFactory
from balancers.by_model_traits import Balanced, CostOptimized, Priority, QualityOptimized
from balancers.ensemble import Ensemble
from balancers.latency import LatencyAware
from balancers.least_connections import LeastConnections
from balancers.power_of_two import PowerOfTwo
from balancers.prefix_affinity import PrefixAffinity
from balancers.random_choice import RandomChoice
from balancers.request import StrategySettings
from balancers.round_robin import RoundRobin
from balancers.specialization import Specialization
from balancers.weighted import SmoothWeighted

STRATEGIES: dict[str, BalancerFactory] = {
    "round_robin": RoundRobin,
    "weighted": SmoothWeighted,
    "weighted_round_robin": SmoothWeighted,
    "least_connections": LeastConnections,
    "random": RandomChoice,
    "power_of_two": PowerOfTwo,
    "latency": LatencyAware,
    "adaptive": Adaptive,
    "cost_optimized": CostOptimized,
    "quality_optimized": QualityOptimized,
    "balanced": Balanced,
    "priority": Priority,
    "specialization": Specialization,
    "prefix_affinity": PrefixAffinity,
    "ensemble": Ensemble,
}
# Strategies whose choice follows the spend: they obey the budget (budget.on_exhausted).
COST_AWARE = frozenset({"cost_optimized", "balanced", "ensemble"})


class UnknownStrategyError(ValueError):
    def __init__(self, name: object) -> None:
        super().__init__(
            f"unknown strategy {name!r}; valid strategies: {', '.join(strategy_names())}"
        )
        self.name = name


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def create_balancer(
    name: str,
    backends: Sequence[Any],
    rng: random.Random,
    settings: StrategySettings | None = None,
) -> Balancer:
    factory = STRATEGIES.get(name)
    if factory is None:
        raise UnknownStrategyError(name)
    return factory(backends, rng, settings)
