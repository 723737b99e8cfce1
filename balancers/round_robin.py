"""Round robin: each available backend in turn, skipping those that cannot take a request."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, Balancer, OptionalRequest
from balancers.registry import register
from balancers.request import StrategySettings


@register("round_robin", order=1)
class RoundRobin(Balancer):
    """The cursor is a position in the pool, so this policy sees the whole pool (`select`)."""

    __slots__ = ("_next",)

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        self._next = 0

    def select(
        self, backends: Sequence[B], exclude: Collection[B] = (), request: OptionalRequest = None
    ) -> B | None:
        count = len(backends)
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            backend = backends[index]
            if backend.available() and backend not in exclude:
                self._next = index + 1
                return backend
        return None
