"""One backend (`Upstream`) and a group of interchangeable ones (`Pool`).

Request-path state is plain counters on the Upstream: the event loop serialises access, so no
locks. `available()` combines health, breaker and capacity in one place (as Caddy's hosts.go).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from urllib.parse import urlsplit

from balancers.base import Balancer, least_loaded
from balancers.decisions import DecisionCache, DecisionStats
from balancers.registry import create_balancer
from balancers.request import RoutingRequest, StrategySettings
from circuit.breaker import CircuitBreaker, iso_utc
from health.stats import LatencyRing, OutcomeRing, PeakEwma
from proxy.shared_counts import SharedCount
from proxy.snapshot import UpstreamSnapshot
from proxy.transport import Origin
from proxy.verdict import BACKEND_FAULTS, SUCCESSES, Verdict

READY, DRAIN, MAINT = "ready", "drain", "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)
MAX_CACHED_STARTS = 32  # per backend: the fixed routes, plus a few pass-through paths


class Upstream:
    __slots__ = (
        "name",
        "url",
        "pool",
        "model",
        "weight",
        "max_concurrent",
        "active",
        "shared_active",
        "requests",
        "failures",
        "healthy",
        "cooldown_until",
        "admin_state",
        "served_model",
        "extra_headers",
        "replaced_headers",
        "backup",
        "breaker",
        "last_check",
        "last_response_ms",
        "cost",
        "quality",
        "priority",
        "specializations",
        "capabilities",
        "latency",
        "latencies",
        "outcomes",
        "origin",
        "_base_path",
        "_host",
        "_starts",
        "_clock",
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._clock = clock
        self.url = url.rstrip("/")
        self.pool = pool
        self.model = model
        self.weight = weight
        self.max_concurrent = max_concurrent
        self.active = 0
        # With several workers, the gateway-wide in-flight count (cluster binds it).
        self.shared_active: SharedCount | None = None
        self.requests = 0
        self.failures = 0
        self.healthy = True  # the active health checks' verdict
        self.cooldown_until = 0.0  # monotonic time before which it asked for no traffic (429)
        # The operator's word (HAProxy's server state): ready, drain (no new requests; those
        # in flight finish; health checks go on) or maint (the same, shown as maintenance).
        self.admin_state = READY
        # Per-endpoint settings: the name the backend serves the model under (None: the
        # model's own), header lines it gets instead of the client's (an API key), and
        # whether it serves only while no other member of its pool is live.
        self.served_model: str | None = None
        self.extra_headers = b""
        self.replaced_headers: frozenset[bytes] = frozenset()
        self.backup = False
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.last_check: float | None = None
        self.last_response_ms: float | None = None
        # What request-aware strategies route on: the model's configured traits...
        self.cost = 0.0
        self.quality = 0.5
        self.priority = 100
        self.specializations: frozenset[str] = frozenset()
        self.capabilities: frozenset[str] = frozenset()
        # ...and what real traffic says (see `record`): time to response headers as a
        # peak-EWMA for routing and as a ring for percentiles, and the recent outcomes.
        self.latency = PeakEwma(clock=clock)
        self.latencies = LatencyRing()
        self.outcomes = OutcomeRing()
        # The transport's connection pool for this backend, bound on first use.
        self.origin: Origin | None = None
        parts = urlsplit(self.url)
        self._base_path = parts.path
        self._host = parts.netloc.rpartition("@")[2]
        self._starts: dict[tuple[str, str], bytes] = {}

    def set_admin_state(self, state: str) -> bool:
        """The operator's state for this backend (one of ADMIN_STATES); True when it changed.
        The caller refreshes its router's pools, which route around drained members."""
        state = ADMIN_STATES[ADMIN_STATES.index(state)]  # the constant itself
        changed = state != self.admin_state
        self.admin_state = state
        return changed

    def set_extra_headers(self, headers: tuple[tuple[str, str], ...]) -> None:
        """Header lines every request to this backend carries, in place of the client's
        headers of the same names."""
        self.extra_headers = b"".join(
            f"{name}: {value}\r\n".encode("latin-1") for name, value in headers
        )
        self.replaced_headers = frozenset(name.lower().encode() for name, _ in headers)
        self._starts.clear()

    def request_start(self, method: str, path: str) -> bytes:
        """The request line, Host header and extra headers of `method` on `path` (already
        percent-encoded), built once for the fixed routes; arbitrary pass-through paths are
        not remembered."""
        key = (method, path)
        start = self._starts.get(key)
        if start is None:
            target = self._base_path + path
            start = (
                f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\n".encode(
                    "utf-8", "surrogateescape"
                )
                + self.extra_headers
            )
            if len(self._starts) < MAX_CACHED_STARTS:
                self._starts[key] = start
        return start

    def record(self, verdict: Verdict | None, latency: float | None = None) -> None:
        """What one exchange with this backend said about it: the one place that feeds the
        breaker, the failure counter, the outcome ring and the latency estimates.

        `latency` is the time to the response headers, when they came. `verdict` None: the
        headers say success so far, and the outcome is recorded once, when the body has ended
        (a body that breaks off is a failure, not a success then a failure: a half-open
        breaker must not close on a trial's headers). A THROTTLED answer is neither a success
        nor a failure (the caller cools the backend down); a client that left says nothing
        about the backend.
        """
        breaker = self.breaker
        if latency is not None:
            breaker.record_latency(latency)
            self.latency.observe(latency)
            self.latencies.add(latency)
        if verdict is None:
            return
        if verdict in SUCCESSES:
            breaker.record_success()
            self.outcomes.add(True)
        elif verdict in BACKEND_FAULTS:
            self.failures += 1
            self.outcomes.add(False)
            breaker.record_failure()

    def available(self) -> bool:
        return (
            self.active < self.max_concurrent
            and (self.shared_active is None or self.has_room_gateway_wide())
            and self.breaker.allows()
            and (not self.cooldown_until or self._cooled_down())
        )

    def has_room_gateway_wide(self) -> bool:
        """Below max_concurrent counting every worker's requests to this backend."""
        assert self.shared_active is not None
        return self.active + self.shared_active.elsewhere() < self.max_concurrent

    def take_slot(self) -> bool:
        """Count one more request in flight; False (and nothing counted) when, seen across
        workers, the backend turned out to be full. The count is published before the others
        are read again, so two workers taking the last slot at the same moment both see the
        other's and at most one keeps it (both may back off; their waiters retry)."""
        self.active += 1
        shared = self.shared_active
        if shared is not None:
            shared.publish(self.active)
            if self.active + shared.elsewhere() > self.max_concurrent:
                self.active -= 1
                shared.publish(self.active)
                return False
        return True

    def give_back_slot(self) -> None:
        self.active -= 1
        if self.shared_active is not None:
            self.shared_active.publish(self.active)

    def live(self) -> bool:
        """Could serve soon: circuit not open, not cooling down; maybe just full."""
        return not self.breaker.is_open() and (not self.cooldown_until or self._cooled_down())

    def cool_down(self, seconds: float) -> None:
        """No new requests for `seconds` (a 429's Retry-After)."""
        self.cooldown_until = max(self.cooldown_until, self._clock() + seconds)

    def _cooled_down(self) -> bool:
        if self._clock() >= self.cooldown_until:
            self.cooldown_until = 0.0
            return True
        return False

    def snapshot(self) -> UpstreamSnapshot:
        """The backend's one JSON shape, with its breaker's."""
        return {
            "name": self.name,
            "url": self.url,
            "pool": self.pool,
            "model": self.model,
            "weight": self.weight,
            "active": self.active,
            "max_concurrent": self.max_concurrent,
            "requests": self.requests,
            "failures": self.failures,
            "healthy": self.healthy,
            "last_check": iso_utc(self.last_check),
            "response_time_ms": self.last_response_ms,
            "cooling_down": bool(self.cooldown_until) and not self._cooled_down(),
            "admin_state": self.admin_state,
            "breaker": self.breaker.snapshot(),
        }

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
        "uses_request",
        "cost_aware",
        "backups",
        "primaries",
        "renames",
        "settings",
        "stats",
        "cache",
        "_cacheable",
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
        settings: StrategySettings | None = None,
        stats: DecisionStats | None = None,
        cache: DecisionCache | None = None,
    ) -> None:
        self.name = name
        self.upstreams = tuple(upstreams)
        self.backups = tuple(u for u in self.upstreams if u.backup)
        self.primaries = tuple(u for u in self.upstreams if not u.backup)
        # A member serves the model under another name: bodies may need it spliced in.
        self.renames = any(u.served_model is not None for u in self.upstreams)
        self.health_path = health_path
        self.failing_open = False
        self.shunned: tuple[Upstream, ...] = ()  # unhealthy members, while others are healthy
        self.settings = settings
        self.stats = stats if stats is not None else DecisionStats()
        self.cache = cache
        self._rng = rng if rng is not None else random.Random()
        self.use_strategy(strategy)

    def use_strategy(self, strategy: str) -> None:
        self.balancer: Balancer = create_balancer(
            strategy, self.upstreams, self._rng, self.settings
        )
        self.strategy = strategy
        # The policy's declared capabilities, read once per swap.
        self.uses_request = self.balancer.uses_request
        self.cost_aware = self.balancer.cost_aware
        self._cacheable = self.balancer.cacheable and (self.cache is not None)

    def select(
        self, exclude: Collection[Upstream] = (), request: RoutingRequest | None = None
    ) -> Upstream | None:
        if self.shunned:
            exclude = (*exclude, *self.shunned)
        if self.backups and self._primary_live(exclude):
            exclude = (*exclude, *self.backups)
        started = time.perf_counter()
        if self._cacheable:
            chosen = self._select_cached(exclude, request)
        else:
            chosen = self.balancer.select(self.upstreams, exclude, request)
        self.stats.record(self.strategy, time.perf_counter() - started)
        return chosen

    def _select_cached(
        self, exclude: Collection[Upstream], request: RoutingRequest | None
    ) -> Upstream | None:
        """Reuse the model chosen for the same request fingerprint; the least loaded of its
        available backends serves. Falls back to a fresh decision when none is available."""
        assert self.cache is not None
        key = (
            self.stats.generation,
            self.strategy,
            request.fingerprint() if request is not None else None,
        )
        model = self.cache.get(key)
        if model is not None:
            replicas = [
                u for u in self.upstreams if u.model == model and u.available() and u not in exclude
            ]
            chosen = least_loaded(replicas, self._rng)
            if chosen is not None:
                self.stats.cache_hits += 1
                return chosen
        self.stats.cache_misses += 1
        chosen = self.balancer.select(self.upstreams, exclude, request)
        if chosen is not None and chosen.model is not None:
            self.cache.put(key, chosen.model)
        return chosen

    def _primary_live(self, exclude: Collection[Upstream]) -> bool:
        return any(u.live() and u not in exclude for u in self.primaries)

    def has_live(self, exclude: Collection[Upstream] = ()) -> bool:
        return any(u.live() and u not in exclude and u not in self.shunned for u in self.upstreams)

    def refresh_health(self) -> None:
        """Route around unhealthy members, unless every member is unhealthy: then fail open
        and try them all rather than refuse everything (Envoy's panic mode); breakers still
        apply. Per pool, so `auto` avoids a model whose own pool is failing open. Members an
        operator drained are routed around in every case."""
        serving = [u for u in self.upstreams if u.admin_state == READY]
        healthy = any(u.healthy for u in serving)
        self.failing_open = bool(serving) and not healthy
        # Drained members are never chosen, so the request path pays nothing for them.
        self.shunned = tuple(
            u for u in self.upstreams if u.admin_state != READY or (healthy and not u.healthy)
        )

    def __repr__(self) -> str:
        return f"<Pool {self.name} strategy={self.strategy} upstreams={len(self.upstreams)}>"
