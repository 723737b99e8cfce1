"""Power of two choices: sample two available backends at random and take the one with fewer
requests in flight (Envoy's least_request with choice_count 2). Nearly as good as a full
least-connections scan, without herding every request onto the same momentary minimum."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancers.base import B, RandomizedBalancer, eligible
from balancers.request import RoutingRequest


def less_loaded(first: B, second: B) -> B:
    """The one with fewer requests in flight; the first of the random pair on a tie."""
    return second if second.active < first.active else first


class PowerOfTwo(RandomizedBalancer):
    """Subclasses change only how the sampled pair is compared (`better`)."""

    __slots__ = ()

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = eligible(backends, exclude)
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        first, second = self._rng.sample(candidates, 2)
        return self.better(first, second, candidates)

    def better(self, first: B, second: B, candidates: Sequence[B]) -> B:
        return less_loaded(first, second)
