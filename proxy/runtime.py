"""The bundle a reload swaps: the config, the router, and every piece of request-path state
built from them, with the rule for what carries over written once (`reloaded`).

Handlers read `LiveRuntime.runtime` once per request and keep that runtime to the end, so a
request in flight during a reload finishes on the runtime it started with; the state it
releases into (admission, counters, telemetry) is carried over, so nothing is counted twice
or lost.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from admission.queue import Admission
from admission.ratelimit import RateLimiter
from admission.shedding import LoadShedder
from config.schema import Config, ModelConfig
from proxy.budget_period import SpendPeriod
from proxy.headers import TrustedProxies
from proxy.jsonbody import json_bytes
from proxy.retry import RetryPolicy
from proxy.router import Router
from proxy.transport import Timeouts, UpstreamClient
from telemetry.histogram import HistogramSeries
from telemetry.outcome import Telemetry

if TYPE_CHECKING:  # a sink, attached by the composition root; the request path never calls it
    from telemetry.accounting import Accountant

MAX_REQUEST_ID_LENGTH = 200


class GatewayStats:
    """Counters of what the request path did, for the admin and metrics endpoints."""

    # Failovers are counted once, by Telemetry.record, from the outcome forward marks.
    __slots__ = ("retries", "fallbacks", "stale_retries", "client_closed")

    def __init__(self) -> None:
        self.retries = 0
        self.fallbacks = 0
        self.stale_retries = 0
        self.client_closed = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "retries": self.retries,
            "fallbacks": self.fallbacks,
            "stale_retries": self.stale_retries,
            "client_closed": self.client_closed,
        }


# Parts a reload hands to the next runtime as they are (see Runtime._carry_over).
CARRIED_AS_IS = (
    "telemetry",
    "stats",
    "client",
    "accountant",
    "spend_offset",
    "spend_elsewhere",
    "sharing",
    "gap_series",
    "draining",
    "_id_prefix",
    "_ids",
)


class Sharing(Protocol):
    """Binds a runtime's parts to what the workers share (cluster.worker_share); called for
    every runtime a reload builds, so backends a reload adds are shared from their first
    request."""

    def bind(self, runtime: Runtime) -> None: ...


class Runtime:
    """Everything one request reads: built once per config, never changed by a request except
    through the counters of its parts."""

    __slots__ = (
        *CARRIED_AS_IS,
        "config",
        "router",
        "clock",
        "rng",
        "admission",
        "retry",
        "rate_limiter",
        "shedder",
        "stream_timeouts",
        "request_timeouts",
        "priority_header",
        "trusted_proxies",
        "body_timeout",
        "models",
        "model_names",
        "models_body",
        "model_bodies",
        "spend_period",
        "own_framing",
        "_wall",
    )

    def __init__(
        self,
        config: Config,
        router: Router,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        previous: Runtime | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`wall`: the wall clock budget periods (UTC days, months) are read from."""
        self.config = config
        self.router = router
        self.clock = clock
        self._wall = wall
        self.rng = rng if rng is not None else random.Random()
        if previous is None:
            self._start_fresh(config)
        else:
            self._carry_over(previous, config)
        routing = config.routing
        # Non-streamed: the total bounds silence too. Streams have no total: silence (before
        # the headers and between chunks) is what ends them.
        self.stream_timeouts = Timeouts(
            connect=routing.connect_timeout,
            first_byte=routing.first_byte_timeout,
            idle=routing.idle_timeout,
        )
        self.request_timeouts = Timeouts(
            connect=routing.connect_timeout,
            first_byte=routing.first_byte_timeout,
            total=routing.request_timeout,
        )
        self.priority_header = config.queue.priority_header
        self.trusted_proxies = TrustedProxies(config.server.trusted_proxies)
        self.body_timeout = config.server.body_timeout
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self.model_names = ", ".join(self.models)
        self.models_body = models_list_body(config)
        # OK answers are framed by the gateway itself (proxy.attempt), unless CORS needs
        # aiohttp's response preparation to add its headers.
        self.own_framing = not config.cors.allowed_origins
        self.model_bodies = {
            entry["id"]: json_bytes(entry) for entry in orjson.loads(self.models_body)["data"]
        }
        self.bind_origins()
        if self.sharing is not None:
            self.sharing.bind(self)

    def _start_fresh(self, config: Config) -> None:
        clock = self.clock
        self.admission = Admission(
            config.routing.max_concurrent_requests, config.queue.size, config.queue.timeout, clock
        )
        self.retry = RetryPolicy(config.retry, clock=clock)
        self.rate_limiter = RateLimiter(config, clock)
        self.shedder = LoadShedder(
            config.load_shedding, self.admission, self.router, clock, self.rng
        )
        self.telemetry = Telemetry(clock)
        self.stats = GatewayStats()
        self.client: UpstreamClient | None = None  # opened by start()
        self.accountant: Accountant | None = None  # set by the app when accounting is on
        self.spend_offset = 0.0  # spend accounted before this process started
        # What the other workers (and hosts) spent, kept current by cluster/ off the path.
        self.spend_elsewhere = 0.0
        self.sharing: Sharing | None = None  # set by the app when workers share state
        # pool name -> observe(seconds) for gaps between streamed chunks (Prometheus), if on
        self.gap_series: Callable[[str], HistogramSeries] | None = None
        self.draining = False
        self.spend_period = SpendPeriod(config.budget.period, self._wall)
        self._id_prefix = os.urandom(4).hex() + "-"
        self._ids = itertools.count(1)

    def _carry_over(self, previous: Runtime, config: Config) -> None:
        """What survives a reload, in one place. Kept and re-tuned: admission (in-flight
        counts, the queue and its waiters, the drain rate), the retry budget's window, the
        shedder's failure window and counters, rate-limit buckets whose limit is unchanged.
        Kept as they are: telemetry windows, counters, accounting, the upstream client and
        its connection pools (connection_pool settings need a restart), draining, request
        ids. The router is new, but backends that stay keep their Upstream (breaker, health,
        in-flight count; see Router). Rebuilt: timeouts, the models list."""
        self.admission = previous.admission
        self.admission.resize(
            config.routing.max_concurrent_requests, config.queue.size, config.queue.timeout
        )
        self.retry = RetryPolicy(config.retry, budget=previous.retry.budget, clock=self.clock)
        self.rate_limiter = previous.rate_limiter.reconfigured(config)
        self.shedder = previous.shedder
        self.shedder.reconfigure(config.load_shedding, self.router)
        self.spend_period = previous.spend_period.reconfigured(config.budget.period)
        for name in CARRIED_AS_IS:
            setattr(self, name, getattr(previous, name))

    def reloaded(self, config: Config, router: Router) -> Runtime:
        """The runtime for a reloaded config (see `_carry_over` for what it keeps)."""
        return Runtime(
            config, router, clock=self.clock, rng=self.rng, previous=self, wall=self._wall
        )

    async def start(self) -> None:
        pool = self.config.connection_pool
        self.client = UpstreamClient(
            limit=pool.limit,
            limit_per_host=pool.limit_per_host,
            keepalive_timeout=pool.keepalive_timeout,
            ca_file=pool.ca_file,
        )
        self.bind_origins()

    def bind_origins(self) -> None:
        """Each backend's connection pool, looked up once (at start and for every reload,
        whose router may bring new backends) rather than on every request."""
        if self.client is not None:
            for upstream in self.router.upstreams:
                upstream.origin = self.client.origin(upstream.url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        self.client = None

    def new_request_id(self, given: str | None) -> str:
        """The client's X-Request-ID when it sent a sane one, else ours (prefix + counter)."""
        if given and len(given) <= MAX_REQUEST_ID_LENGTH:
            return given
        return self._id_prefix + str(next(self._ids))

    def spent(self) -> float:
        """Spend in the budget's period (budget.period; lifetime by default): this process's,
        what was accounted in the period before the gateway started, and what the other
        workers and hosts report for the period."""
        own = self.period_spend()
        return own + self.spend_offset + self.spend_elsewhere

    def period_spend(self) -> float:
        """This process's own spend in the budget's period (what it tells the others)."""
        total = self.telemetry.cost_total
        period = self.spend_period
        if period.current(total):  # a new day or month: what came before is the last one's
            self.spend_offset = 0.0
            self.spend_elsewhere = 0.0  # until the others report for the new period
        return total - period.base

    def __repr__(self) -> str:
        return (
            f"<Runtime {self.config.source} strategy={self.router.strategy}"
            f" {self.admission!r} backends={len(self.router.upstreams)}"
            f" draining={self.draining}>"
        )


class LiveRuntime:
    """The runtime serving now. Everything that outlives a reload (route handlers, the admin
    plane, metrics) holds this and reads `.runtime` when it runs; a reload swaps it."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def swap(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __repr__(self) -> str:
        return f"<LiveRuntime {self.runtime!r}>"


def models_list_body(config: Config) -> bytes:
    """GET /v1/models, in OpenAI's list format: built once per config."""
    created = int(time.time())
    data: list[dict[str, Any]] = [
        {
            "id": model.name,
            "object": "model",
            "created": created,
            "owned_by": "request-router",
            "capabilities": list(model.capabilities),
            "specializations": list(model.specializations),
            "context_length": model.context_length or None,  # 0: not configured
        }
        for model in config.models
    ]
    return json_bytes({"object": "list", "data": data})
