"""Latency: peak-EWMA of time to response headers x (requests in flight + 1), picking by power
of two choices among eligible backends (Envoy's peak-EWMA, nginx's least_time). A backend with
no samples yet (new, or just recovered from an open circuit) is scored at the average of the
others: neutral, neither favoured nor shunned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from balancers.base import B, Backend
from balancers.power_of_two import PowerOfTwo, less_loaded
from balancers.registry import register

TIE = 0.05  # costs closer than this fraction are equal: latency samples are noisy


def neutral_latency(backends: Sequence[Any]) -> float | None:
    known = [b.latency.value for b in backends if b.latency.value is not None]
    return sum(known) / len(known) if known else None


@register("latency", order=6)
class LatencyAware(PowerOfTwo):
    """Power of two choices, comparing latency x load instead of load alone."""

    __slots__ = ()

    def better(self, first: B, second: B, candidates: Sequence[B]) -> B:
        known = [b.latency.value for b in candidates if b.latency.value is not None]
        if not known:  # nothing measured yet: plain least-loaded of the two
            return less_loaded(first, second)
        neutral = sum(known) / len(known)
        best = min(known)
        first_cost = self.cost(first, neutral, best)
        second_cost = self.cost(second, neutral, best)
        if abs(first_cost - second_cost) <= TIE * max(first_cost, second_cost):
            return less_loaded(first, second)  # within measurement noise
        return second if second_cost < first_cost else first

    @staticmethod
    def cost(backend: Backend, neutral: float, best: float) -> float:
        """Unmeasured: the average. Measured: its peak-EWMA, drifting toward the best value
        while it gets no traffic, so a backend that was slow once is probed again later."""
        latency = backend.latency
        estimate = neutral if latency.value is None else latency.estimate(best)
        return estimate * (backend.active + 1)
