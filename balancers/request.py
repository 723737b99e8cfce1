"""What a request-aware strategy may know of the request being routed, and the strategy
settings that come from config. Built only when the strategy or constraints need it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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


@dataclass(frozen=True, slots=True)
class StrategySettings:
    # adaptive: score = health x (load·w + latency·w + error·w)
    adaptive_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)
    # balanced: weights of cost, latency, quality, load
    balanced_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    ensemble: tuple[tuple[str, float], ...] = (
        ("latency", 0.4),
        ("cost_optimized", 0.3),
        ("specialization", 0.3),
    )
    affinity_prefix_chars: int = 256
    affinity_load_factor: float = 1.25
    latency_decay_seconds: float = 10.0
    slow_latency: float = 2.0  # seconds: a p95 at or above this scores 0 on latency
    specializations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic  # the simulator passes its virtual clock
