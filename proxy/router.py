"""The pools a config describes, and the runtime strategy swap over them."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from functools import partial

from balancers.decisions import DecisionCache, DecisionStats
from balancers.registry import create_balancer
from balancers.request import StrategySettings
from circuit.breaker import BreakerState, CircuitBreaker
from config.schema import CircuitBreakerConfig, Config, EndpointConfig
from proxy.upstream import Pool, Upstream

AUTO_POOL = "auto"

log = logging.getLogger("request_router")


def configure_breaker(breaker: CircuitBreaker, config: CircuitBreakerConfig) -> None:
    breaker.threshold = config.threshold
    breaker.recovery_time = config.timeout
    breaker.max_recovery_time = config.max_timeout
    breaker.half_open_limit = config.half_open_limit
    breaker.latency_threshold = config.latency_threshold if config.adaptive else None
    breaker.slow_request_limit = config.slow_request_limit
    breaker.slow_window = config.slow_window


class Router:
    """Holds every pool: one per model, `auto` (all model backends, for requests that leave the
    model open), `qdrant` and `embedding`. Upstream objects are shared between a model's pool and
    `auto`, so in-flight counts and breakers are one per backend whichever way it was chosen."""

    def __init__(
        self,
        config: Config,
        rng: random.Random | None = None,
        previous: Router | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`previous`: the router this one replaces on a reload. A backend that is still there
        (same name and URL) keeps its Upstream object, so its in-flight count, breaker and
        health carry over, and requests in flight on it release into the same counters.
        `clock`: the monotonic clock of the breakers, cool-downs, latency estimates and
        decision caches (a reload keeps the previous router's)."""
        self._rng = rng if rng is not None else random.Random()
        clock = previous.clock if previous is not None else clock
        self.clock: Callable[[], float] = clock
        self.strategy = config.routing.strategy
        routing = config.routing
        self.settings = StrategySettings(
            policies=routing.policies,
            slow_latency=config.circuit_breaker.latency_threshold,
            clock=clock,
        )
        # One set of decision statistics for the whole gateway; a reload keeps it.
        self.decisions: DecisionStats = (
            previous.decisions if previous is not None else DecisionStats()
        )
        self._cache_ttl = routing.cache_ttl
        self._cache_size = routing.cache_size
        kept = {(u.name, u.url): u for u in previous.upstreams} if previous is not None else {}

        def upstream(endpoint: EndpointConfig, pool: str, model: str | None) -> Upstream:
            existing = kept.get((endpoint.name, endpoint.url))
            if existing is not None:
                existing.pool = pool
                existing.model = model
                existing.weight = endpoint.weight
                existing.max_concurrent = endpoint.max_concurrent
                configure_breaker(existing.breaker, config.circuit_breaker)
                chosen = existing
            else:
                breaker = CircuitBreaker(clock=clock)
                configure_breaker(breaker, config.circuit_breaker)
                chosen = Upstream(
                    endpoint.name,
                    endpoint.url,
                    pool,
                    model=model,
                    weight=endpoint.weight,
                    max_concurrent=endpoint.max_concurrent,
                    breaker=breaker,
                    clock=clock,
                )
            served = endpoint.served_model_name
            # Model pools only: the embedding and Qdrant routes do not name a model to rewrite.
            renamed = model is not None and served is not None and served != model
            chosen.served_model = served if renamed else None
            chosen.set_extra_headers(endpoint.headers)
            chosen.backup = endpoint.backup
            return chosen

        self.models: dict[str, Pool] = {}
        for model in config.models:
            members = [upstream(e, model.name, model.name) for e in model.endpoints]
            for member in members:
                member.cost = model.cost_per_request
                member.quality = model.quality
                member.priority = model.priority
                member.specializations = frozenset(model.specializations)
                member.capabilities = frozenset(model.capabilities)
            self.models[model.name] = self._pool(model.name, members, model.health_path)
        self.auto = self._pool(
            AUTO_POOL, [u for pool in self.models.values() for u in pool.upstreams], "/health"
        )
        self.qdrant = self._pool(
            "qdrant",
            [upstream(e, "qdrant", None) for e in config.qdrant.endpoints],
            config.qdrant.health_path,
        )
        # Where /qdrant/ writes go (qdrant.writes): the first endpoint that is not a backup,
        # as a pool of its own (same Upstream objects), and the other replicas for copies.
        self.qdrant_writes = config.qdrant.writes
        primaries = self.qdrant.primaries[:1] or self.qdrant.upstreams[:1]
        self.qdrant_primary = self._pool("qdrant", list(primaries), config.qdrant.health_path)
        self.qdrant_replicas = tuple(u for u in self.qdrant.upstreams if u not in primaries)
        self.embedding = self._pool(
            "embedding",
            [upstream(e, "embedding", None) for e in config.embedding.endpoints],
            config.embedding.health_path,
        )
        self.pools: dict[str, Pool] = {
            AUTO_POOL: self.auto,
            **self.models,
            "qdrant": self.qdrant,
            "embedding": self.embedding,
        }
        # model -> the pools that serve it when its own cannot (config `fallbacks`)
        self.fallbacks: dict[str, tuple[Pool, ...]] = {
            model: tuple(self.models[name] for name in chain)
            for model, chain in config.fallbacks.items()
        }
        # models whose chain also takes their traffic when they are merely full (opt-in)
        self.fallback_when_busy = config.fallback_when_busy
        self.upstreams: tuple[Upstream, ...] = tuple(
            u for name, pool in self.pools.items() if name != AUTO_POOL for u in pool.upstreams
        )
        for member in self.upstreams:
            member.breaker.on_change = partial(self._on_breaker_change, member)
        # Backends kept from the previous router keep their health and admin state: the new
        # pools route around them from the start, not from the next health change.
        self.refresh_health()

    def refresh_health(self) -> None:
        """Recompute every pool's routing view after a health verdict changed."""
        self.decisions.invalidate()
        for pool in self.pools.values():
            was_failing_open = pool.failing_open
            pool.refresh_health()
            if pool.failing_open and not was_failing_open:
                log.warning("every backend of pool %s is unhealthy: failing open", pool.name)
        self.qdrant_primary.refresh_health()

    def home_pools(self) -> list[Pool]:
        """Every pool but `auto`: each backend belongs to exactly one of these."""
        return [pool for name, pool in self.pools.items() if name != AUTO_POOL]

    def _pool(self, name: str, members: list[Upstream], health_path: str) -> Pool:
        return Pool(
            name,
            members,
            self.strategy,
            health_path=health_path,
            rng=self._rng,
            settings=self.settings,
            stats=self.decisions,
            cache=(
                DecisionCache(self._cache_ttl, self._cache_size, self.clock)
                if self._cache_ttl
                else None
            ),
        )

    def _on_breaker_change(
        self, upstream: Upstream, breaker: CircuitBreaker, state: BreakerState
    ) -> None:
        self.decisions.invalidate()
        if state is BreakerState.CLOSED:
            upstream.latency.reset()  # recovered: scored neutrally again, not by its past
            log.warning("backend %s: circuit closed, serving again", upstream.name)
        elif state is BreakerState.OPEN:
            log.error(
                "backend %s: circuit open for %gs after %d failures",
                upstream.name,
                breaker.open_for,
                breaker.failure_count,
            )
        else:
            log.warning(
                "backend %s: circuit half-open, letting trial requests through", upstream.name
            )

    def set_strategy(self, strategy: str, pool: str | None = None) -> str:
        """Swap the balancer of one pool, or of all; returns the strategy it replaces.

        Raises UnknownStrategyError (old strategy kept) or KeyError for an unknown pool.
        """
        targets = [self.pools[pool]] if pool is not None else list(self.pools.values())
        create_balancer(strategy, (), self._rng, self.settings)  # validate first
        previous = targets[0].strategy if pool is not None else self.strategy
        for target in targets:
            target.use_strategy(strategy)
        if pool is None:
            self.strategy = strategy
        return previous

    def use_strategies(self, strategy: str, pools: Mapping[str, str]) -> bool:
        """The router's strategy and each named pool's, where they differ (pools this router
        does not have are skipped); True when anything changed. Raises UnknownStrategyError
        as set_strategy does."""
        changed = False
        if self.strategy != strategy:
            self.set_strategy(strategy)
            changed = True
        for name, wanted in pools.items():
            pool = self.pools.get(name)
            if pool is not None and pool.strategy != wanted:
                self.set_strategy(wanted, name)
                changed = True
        return changed

    def active_connections(self) -> dict[str, int]:
        return {u.name: u.active for u in self.upstreams}
