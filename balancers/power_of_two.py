"""Power of two choices: sample two available backends at random and take the one with fewer
requests in flight (Envoy's least_request with choice_count 2). Nearly as good as a full
least-connections scan, without herding every request onto the same momentary minimum."""

from __future__ import annotations

from collections.abc import Sequence

from balancers.base import B, Balancer
from balancers.registry import register
from balancers.request import RoutingRequest


def less_loaded(first: B, second: B) -> B:
    """The one with fewer requests in flight; the first of the random pair on a tie."""
    return second if second.active < first.active else first


@register("power_of_two", order=5)
class PowerOfTwo(Balancer):
    """Subclasses change only how the sampled pair is compared (`better`)."""

    __slots__ = ()

    def choose(self, candidates: list[B], request: RoutingRequest | None) -> B | None:
        if len(candidates) < 2:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return self.better(first, second, candidates)

    def better(self, first: B, second: B, candidates: Sequence[B]) -> B:
        return less_loaded(first, second)
