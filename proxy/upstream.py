"""One backend (`Upstream`) and a group of interchangeable ones (`Pool`).

Request-path state is plain counters on the Upstream: the event loop serialises access, so no
locks. `available()` combines health, breaker and capacity in one place (as Caddy's hosts.go).
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence

from balancers.base import Balancer
from balancers.registry import create_balancer
from circuit.breaker import CircuitBreaker


class Upstream:
    __slots__ = (
        "name",
        "url",
        "pool",
        "model",
        "weight",
        "max_concurrent",
        "active",
        "requests",
        "failures",
        "healthy",
        "cooldown_until",
        "breaker",
        "last_check",
        "last_response_ms",
    )

    def __init__(
        self,
        name: str,
        url: str,
        pool: str,
        *,
        model: str | None = None,
        weight: float = 1.0,
        max_concurrent: int = 100,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.pool = pool
        self.model = model
        self.weight = weight
        self.max_concurrent = max_concurrent
        self.active = 0
        self.requests = 0
        self.failures = 0
        self.healthy = True  # the active health checks' verdict
        self.cooldown_until = 0.0  # monotonic time before which it asked for no traffic (429)
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.last_check: float | None = None
        self.last_response_ms: float | None = None

    def available(self) -> bool:
        return (
            self.active < self.max_concurrent
            and self.breaker.allows()
            and (not self.cooldown_until or self._cooled_down())
        )

    def live(self) -> bool:
        """Could serve soon: circuit not open, not cooling down; maybe just full."""
        return not self.breaker.is_open() and (not self.cooldown_until or self._cooled_down())

    def cool_down(self, seconds: float) -> None:
        """No new requests for `seconds` (a 429's Retry-After)."""
        self.cooldown_until = max(self.cooldown_until, time.monotonic() + seconds)

    def _cooled_down(self) -> bool:
        if time.monotonic() >= self.cooldown_until:
            self.cooldown_until = 0.0
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.name} {self.url} active={self.active}/{self.max_concurrent}"
            f" healthy={self.healthy} breaker={self.breaker.state}>"
        )


class Pool:
    """Upstreams that can serve the same requests, and the balancer that picks among them.

    Swapping the strategy replaces the balancer in one assignment; in-flight requests keep
    their Upstream and its counters, so nothing is dropped.
    """

    __slots__ = (
        "name",
        "upstreams",
        "balancer",
        "strategy",
        "health_path",
        "failing_open",
        "shunned",
        "_rng",
    )

    def __init__(
        self,
        name: str,
        upstreams: Sequence[Upstream],
        strategy: str,
        *,
        health_path: str = "/health",
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.upstreams = tuple(upstreams)
        self.health_path = health_path
        self.failing_open = False
        self.shunned: tuple[Upstream, ...] = ()  # unhealthy members, while others are healthy
        self._rng = rng if rng is not None else random.Random()
        self.strategy = strategy
        self.balancer: Balancer = create_balancer(strategy, self.upstreams, self._rng)

    def use_strategy(self, strategy: str) -> None:
        self.balancer = create_balancer(strategy, self.upstreams, self._rng)
        self.strategy = strategy

    def select(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        if self.shunned:
            exclude = (*exclude, *self.shunned)
        return self.balancer.select(self.upstreams, exclude)

    def has_live(self, exclude: Collection[Upstream] = ()) -> bool:
        return any(u.live() and u not in exclude and u not in self.shunned for u in self.upstreams)

    def refresh_health(self) -> None:
        """Route around unhealthy members, unless every member is unhealthy: then fail open
        and try them all rather than refuse everything (Envoy's panic mode); breakers still
        apply. Per pool, so `auto` avoids a model whose own pool is failing open."""
        healthy = any(u.healthy for u in self.upstreams)
        self.failing_open = bool(self.upstreams) and not healthy
        self.shunned = tuple(u for u in self.upstreams if not u.healthy) if healthy else ()

    def __repr__(self) -> str:
        return f"<Pool {self.name} strategy={self.strategy} upstreams={len(self.upstreams)}>"
