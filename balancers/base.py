"""The balancer base class and the helpers policies share, written once.

A balancer keeps only its own cursor (an index, current weights); the counters it reads
(`active`, `weight`, `available()`) live on the backends, so a strategy swap is one assignment.
Most policies only say how to choose among the eligible backends (`choose`); the few whose state
is indexed by position in the pool (round robin, smooth weighted, the hash ring) override
`select` and see the whole pool.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

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
OptionalRequest = RoutingRequest | None  # keeps `select` signatures on one line


class Balancer:
    """Picks one backend of a pool for a request, or none. Subclasses register themselves
    (balancers.registry.register) and declare what they can do in the class attributes below,
    which callers read instead of probing."""

    __slots__ = ("_rng",)

    # Routes on the request's content: the pool builds a RoutingRequest for it.
    uses_request: ClassVar[bool] = False
    # The model choice depends only on the request and backend states: the decision cache may
    # reuse it.
    cacheable: ClassVar[bool] = False
    # The choice follows the spend, so it obeys budget.on_exhausted.
    cost_aware: ClassVar[bool] = False
    # The policy's own settings: a frozen dataclass of `setting()` fields, read from `routing:`
    # itself, or from the mapping `routing.<settings_key>` when the policy names one.
    settings_type: ClassVar[type | None] = None
    settings_key: ClassVar[str | None] = None

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        self._rng = rng
        self.prepare(backends, settings if settings is not None else StrategySettings())

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        """Build per-pool state (cursors, a hash ring) and read the policy's settings."""

    def select(
        self, backends: Sequence[B], exclude: Collection[B] = (), request: OptionalRequest = None
    ) -> B | None:
        """The backend for the next request: available and not in `exclude`, or None.
        `request` is given to strategies that route on its content (`uses_request`)."""
        candidates = eligible(backends, exclude)
        return self.choose(candidates, request) if candidates else None

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        """One of `candidates` (never empty, all eligible)."""
        raise NotImplementedError


def eligible(backends: Sequence[B], exclude: Collection[B]) -> list[B]:
    """The backends that may take a request now: available and not already tried."""
    return [b for b in backends if b.available() and b not in exclude]


def best_by(
    candidates: Iterable[B],
    score: Callable[[B], float],
    rng: random.Random,
    tolerance: float = 0.0,
) -> B | None:
    """The highest-scoring candidate; scores within `tolerance` of the best tie, and ties go
    to a random one so that equal backends share the load."""
    best: list[B] = []
    top = -math.inf
    for backend in candidates:
        value = score(backend)
        if value > top + tolerance:
            top, best = value, [backend]
        elif value >= top - tolerance:
            best.append(backend)
    if not best:
        return None
    return best[0] if len(best) == 1 else rng.choice(best)


def spare_capacity(backend: Backend) -> float:
    """Higher is less loaded: minus the share of `max_concurrent` in flight."""
    return -(backend.active / backend.max_concurrent)


def least_loaded(candidates: Iterable[B], rng: random.Random) -> B | None:
    """Fewest in flight relative to capacity; ties at random."""
    return best_by(candidates, spare_capacity, rng)
