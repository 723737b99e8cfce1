"""Least connections: the backend with the fewest requests in flight (streams count until
their last byte); ties are broken at random so equal backends share the load."""

from __future__ import annotations

from balancers.base import B, Backend, Balancer, best_by
from balancers.registry import register
from balancers.request import RoutingRequest


def fewest_active(backend: Backend) -> float:
    return -backend.active


@register("least_connections", order=3)
class LeastConnections(Balancer):
    __slots__ = ()

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        return best_by(candidates, fewest_active, self._rng)
