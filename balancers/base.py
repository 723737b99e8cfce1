"""The balancer protocol: pick one backend of a pool for a request, or none.

A balancer keeps only its own cursor (an index, current weights); the counters it reads
(`active`, `weight`, `available()`) live on the backends, so a strategy swap is one assignment.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any, Protocol, TypeVar


class Backend(Protocol):
    """What a balancer may read of a backend."""

    active: int
    weight: float

    def available(self) -> bool: ...


B = TypeVar("B", bound=Backend)


class Balancer(Protocol):
    def select(self, backends: Sequence[B], exclude: Collection[B] = ()) -> B | None:
        """The backend for the next request: available and not in `exclude`, or None."""
        ...


class BalancerFactory(Protocol):
    def __call__(self, backends: Sequence[Any], rng: random.Random) -> Balancer: ...


def eligible(backends: Sequence[B], exclude: Collection[B]) -> list[B]:
    return [b for b in backends if b.available() and b not in exclude]
