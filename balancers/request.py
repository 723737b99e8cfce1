"""What a request-aware strategy may know of the request being routed (built only when the
strategy or constraints need it), and the settings bundle every balancer factory is given."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar


class RoutingRequest:
    __slots__ = (
        "request_type",
        "content",
        "affinity_key",
        "stream",
        "max_cost",
        "max_latency_ms",
        "min_quality",
    )

    def __init__(
        self,
        request_type: str | None = None,
        content: str = "",
        affinity_key: str | None = None,
        stream: bool = False,
        max_cost: float | None = None,
        max_latency_ms: float | None = None,
        min_quality: float | None = None,
    ) -> None:
        self.request_type = request_type
        self.content = content
        self.affinity_key = affinity_key  # session id, user, or None: a prefix of the content
        self.stream = stream
        self.max_cost = max_cost
        self.max_latency_ms = max_latency_ms
        self.min_quality = min_quality

    def fingerprint(self) -> tuple[object, ...]:
        """Everything a deterministic model choice depends on (the decision cache key)."""
        return (
            self.request_type,
            self.content[:256],
            self.stream,
            self.max_cost,
            self.max_latency_ms,
            self.min_quality,
        )


# Seconds to response headers at which a response counts as slow: the adaptive strategy scores
# such a p95 at 0, and it is the default of circuit_breaker.latency_threshold, which config
# passes back here as `slow_latency` (declared once, here, as balancers cannot read config).
SLOW_RESPONSE_SECONDS = 2.0

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class StrategySettings:
    """What a balancer factory is given. Each policy declares its own settings dataclass beside
    its algorithm (`Balancer.settings_type`); `policies` holds the configured instances and
    `of()` hands a policy its own, or the declared defaults when config gave none."""

    policies: tuple[object, ...] = ()
    slow_latency: float = SLOW_RESPONSE_SECONDS
    clock: Callable[[], float] = time.monotonic  # the simulator passes its virtual clock

    def of(self, kind: type[S]) -> S:
        for policy in self.policies:
            if isinstance(policy, kind):
                return policy
        return kind()
