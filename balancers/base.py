"""The balancer protocol: pick one backend of a pool for a request, or none.

A balancer keeps only its own cursor (an index, current weights); the counters it reads
(`active`, `weight`, `available()`) live on the backends, so a strategy swap is one assignment.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any, Protocol, TypeVar

from balancers.request import RoutingRequest, StrategySettings
from circuit.breaker import CircuitBreaker
from health.stats import LatencyRing, OutcomeRing, PeakEwma


class Backend(Protocol):
    """What a balancer may read of a backend (proxy.upstream.Upstream has it all)."""

    name: str
    model: str | None
    active: int
    max_concurrent: int
    weight: float
    cost: float
    quality: float
    priority: int
    specializations: frozenset[str]
    latency: PeakEwma
    latencies: LatencyRing
    outcomes: OutcomeRing
    breaker: CircuitBreaker

    def available(self) -> bool: ...


B = TypeVar("B", bound=Backend)


class Balancer(Protocol):
    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        """The backend for the next request: available and not in `exclude`, or None.
        `request` is given to strategies that route on its content (`uses_request`)."""
        ...


class BalancerFactory(Protocol):
    def __call__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> Balancer: ...


class RandomizedBalancer:
    """Base of the strategies whose only state is the shared random source (ties, samples)."""

    __slots__ = ("_rng",)

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        self._rng = rng


def uses_request(balancer: Balancer) -> bool:
    return bool(getattr(balancer, "uses_request", False))


def least_loaded(candidates: Sequence[B], rng: random.Random) -> B | None:
    """Fewest in flight relative to capacity; ties at random."""
    best: list[B] = []
    lowest = 2.0
    for backend in candidates:
        load = backend.active / backend.max_concurrent
        if load < lowest:
            lowest = load
            best = [backend]
        elif load == lowest:
            best.append(backend)
    if not best:
        return None
    return best[0] if len(best) == 1 else rng.choice(best)


def eligible(backends: Sequence[B], exclude: Collection[B]) -> list[B]:
    return [b for b in backends if b.available() and b not in exclude]
