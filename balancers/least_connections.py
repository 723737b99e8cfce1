"""Least connections: the backend with the fewest requests in flight (streams count until
their last byte); ties are broken at random so equal backends share the load."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancers.base import B, RandomizedBalancer
from balancers.request import RoutingRequest


class LeastConnections(RandomizedBalancer):
    __slots__ = ()

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        least: list[B] = []
        fewest = -1
        for backend in backends:
            if not backend.available() or backend in exclude:
                continue
            active = backend.active
            if fewest < 0 or active < fewest:
                fewest = active
                least = [backend]
            elif active == fewest:
                least.append(backend)
        if not least:
            return None
        return least[0] if len(least) == 1 else self._rng.choice(least)
