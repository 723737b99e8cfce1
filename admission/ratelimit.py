"""Rate limits: token buckets, global, per model and per client key -> 429 + Retry-After."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from config.schema import Config
from proxy.errors import RateLimited

MAX_CLIENT_BUCKETS = 10_000  # least recently seen client keys are forgotten beyond this


class TokenBucket:
    """A token bucket; with several workers or hosts it stands for the whole gateway's bucket:
    `admitted` counts what this process granted, and a background sync (cluster/) publishes
    it and takes what the others granted out of `tokens` through `settle`."""

    __slots__ = ("rate", "capacity", "tokens", "updated", "admitted", "_clock")

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate  # tokens per second
        self.capacity = capacity
        self.tokens = capacity
        self.admitted = 0
        self._clock = clock
        self.updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.admitted += 1
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def until_full(self) -> float:
        """Seconds until the bucket is full again, from its balance at the last take."""
        return max(0.0, (self.capacity - self.tokens) / self.rate)

    def settle(self, granted_elsewhere: int) -> None:
        """Take out what other workers or hosts granted since the last sync. The balance may
        go below zero (down to one burst of debt): then this process waits until the
        gateway-wide bucket has refilled, which keeps the long-run rate at the limit."""
        if granted_elsewhere > 0:
            self.tokens = max(-self.capacity, self.tokens - granted_elsewhere)

    def recently_used(self, within: float) -> bool:
        return self._clock() - self.updated < within


# The client a request proved to be (a name from auth.api_keys), set by control.access before
# any handler runs; absent when the gateway does not authenticate clients.
CLIENT = web.RequestKey("client", str)


def client_key(request: web.Request) -> str:
    """Who is asking: the client its key proved it to be, else the peer address. A credential
    nobody checked is never the key (issue 11, item 6): rotating invented tokens would get a
    fresh bucket per request and push real clients' buckets out."""
    if CLIENT in request:
        return "client:" + request[CLIENT]
    return "peer:" + (request.remote or "unknown")


class RateLimiter:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        limits = config.rate_limit
        self._clock = clock
        self.limited = 0
        self.global_bucket = (
            TokenBucket(limits.rps, limits.burst or limits.rps, clock) if limits.rps else None
        )
        self.per_client_rps = limits.per_client_rps
        self.per_client_burst = limits.per_client_burst or limits.per_client_rps
        self.clients: OrderedDict[str, TokenBucket] = OrderedDict()
        self.models = {
            m.name: TokenBucket(m.rpm / 60.0, float(m.rpm), clock) for m in config.models if m.rpm
        }
        self.active = bool(self.global_bucket or self.per_client_rps or self.models)
        self._limits = (limits, _model_limits(config))

    def reconfigured(self, config: Config) -> RateLimiter:
        """The limiter for a reloaded config: this one when no limit changed (its buckets keep
        their tokens), else a new one with full buckets; the refusal count carries over."""
        if self._limits == (config.rate_limit, _model_limits(config)):
            return self
        fresh = RateLimiter(config, self._clock)
        fresh.limited = self.limited
        return fresh

    def check(self, request: web.Request, model: str | None) -> None:
        """Raise RateLimited when any limit that applies is exhausted."""
        if self.global_bucket is not None:
            self._take(self.global_bucket, "the gateway's request rate limit")
        if self.per_client_rps:
            self._take(self._client_bucket(client_key(request)), "your request rate limit")
        if model is not None:
            bucket = self.models.get(model)
            if bucket is not None:
                self._take(bucket, f"the request rate limit of model '{model}'")

    def _take(self, bucket: TokenBucket, what: str) -> None:
        wait = bucket.take()
        if wait:
            self.limited += 1
            raise RateLimited(
                f"{what} is exceeded; retry later",
                headers={
                    "Retry-After": str(max(1, math.ceil(wait))),
                    # OpenAI's names, which SDKs and dashboards read: the bucket's size,
                    # what is left of it, and the time until it is full again.
                    "x-ratelimit-limit-requests": f"{bucket.capacity:g}",
                    "x-ratelimit-remaining-requests": "0",
                    "x-ratelimit-reset-requests": openai_duration(bucket.until_full()),
                },
            )

    def shared_buckets(self) -> list[tuple[str, TokenBucket]]:
        """The buckets that stand for a limit of the whole gateway, by a name every worker
        and host derives the same way: the global one and one per model."""
        buckets = [("global", self.global_bucket)] if self.global_bucket is not None else []
        buckets += [("model:" + name, bucket) for name, bucket in self.models.items()]
        return buckets

    def active_clients(self, within: float) -> list[tuple[str, TokenBucket]]:
        """Client buckets used in the last `within` seconds, most recent first (the dict is
        kept in order of use, so this stops at the first idle one)."""
        active = []
        for key in reversed(self.clients):
            bucket = self.clients[key]
            if not bucket.recently_used(within):
                break
            active.append((key, bucket))
        return active

    def _client_bucket(self, key: str) -> TokenBucket:
        bucket = self.clients.get(key)
        if bucket is None:
            bucket = TokenBucket(self.per_client_rps, self.per_client_burst, self._clock)
            self.clients[key] = bucket
            if len(self.clients) > MAX_CLIENT_BUCKETS:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(key)
        return bucket


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: "1s", "6m0s", "0.5s"."""
    if seconds < 60:
        return f"{max(seconds, 0.001):.3g}s"
    minutes, rest = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s"


def _model_limits(config: Config) -> tuple[tuple[str, int], ...]:
    return tuple((m.name, m.rpm) for m in config.models if m.rpm)
