"""Several gateway hosts behave as one: state shared through Redis (the `redis:` section).

Nothing here is on the request path. Every `redis.sync_interval` (100 ms) a background task
makes one pipelined round trip, and the request path reads only what the last one left in
process memory (token buckets, `runtime.spend_elsewhere`, breakers, the router's strategy).
Each worker process is a member on its own (host:port:worker:pid), so with several workers
the one-host table (cluster.worker_share) leaves limits and spend to this sync.

This module runs the parts; each is told in its own:
- cluster.redis_link: the connection, Redis's breaker, and limits falling back while Redis
  is away (cluster.redis_limits);
- cluster.redis_exchange: one sync's Lua script, which carries membership
  (cluster.redis_members), rate limits and spend, and breaker and 429 hints
  (cluster.redis_hints);
- cluster.redis_overrides: the versioned override record, in the same pipeline now and
  then, and the channel that announces it;
- cluster.redis_keys: the names of it all in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis

from cluster.overrides import OverrideRecord, OverrideStore
from cluster.redis_exchange import SyncExchange
from cluster.redis_hints import BreakerHints
from cluster.redis_keys import Keys
from cluster.redis_limits import SharedLimits
from cluster.redis_link import RedisLink, connect
from cluster.redis_members import Member, Membership, hosts
from cluster.redis_overrides import OverrideMirror
from config.schema import RedisConfig
from proxy.runtime import LiveRuntime

__all__ = ["Member", "RedisSync", "connect"]


class RedisSync:
    """This member's part: the sync task, the channel listener, and what they last saw."""

    def __init__(
        self,
        settings: RedisConfig,
        live: LiveRuntime,
        overrides: OverrideStore,
        member: Member,
        adopted: Callable[[OverrideRecord], None] = lambda record: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`overrides`: this host's record (a file shared by its workers, or memory);
        `adopted`: called after a record from another member was applied (the worker
        table's generation follows it); `clock`: the monotonic clock the breakers read."""
        self.settings = settings
        self.live = live
        self.overrides = overrides
        self.member = member
        self.clock = clock
        keys = Keys(settings.key_prefix)
        self.link = RedisLink(settings, self._redis_down, self._redis_up, clock)
        self.metrics = self.link.metrics
        self.limits = SharedLimits()
        self.membership = Membership(settings.member_ttl, self.metrics)
        self.hints = BreakerHints(clock)
        self.exchange = SyncExchange(
            settings.member_ttl, keys, member, overrides, self.limits, self.membership, self.hints
        )
        self.mirror = OverrideMirror(keys, overrides, live, adopted, settings.retry_after, clock)
        self.client: redis.Redis | None = None
        overrides.on_write.append(self.mirror.publish)

    @property
    def published_hints(self) -> int:
        """This member's own hints in the last sync."""
        return self.hints.published

    # --- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync every interval until cancelled; the channel listener runs beside it."""
        self.client = connect(self.settings)
        listener = asyncio.get_running_loop().create_task(self.mirror.listen(self.client))
        try:
            while True:
                await self.tick()
                await asyncio.sleep(self.settings.sync_interval)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self.client.aclose()

    async def tick(self) -> None:
        """One sync, or the fallback while Redis's breaker is open."""
        await self.link.attempt(self._sync)

    async def _sync(self) -> None:
        """One pipelined round trip: the exchange's script and, now and then, the record's."""
        assert self.client is not None
        runtime = self.live.runtime
        pipe = self.client.pipeline(transaction=False)
        limits = self.exchange.queue(pipe, runtime)
        record = self.mirror.queue(pipe)
        sent = self.clock()
        replies = await pipe.execute()
        received = self.clock()
        self.exchange.read(limits, replies[0], (sent + received) / 2, runtime)
        if record is not None:
            self.mirror.read(record, replies[-1])

    # --- limits while Redis is away and when it is back --------------------------------------

    def _redis_down(self) -> None:
        """A sync failed, or Redis's breaker held one back: limits as `redis.on_failure` says,
        by the members the last successful sync saw."""
        self.limits.rebaseline = True
        self.limits.track(self.live.runtime.rate_limiter)
        self.limits.fall_back(self.settings.on_failure, self.membership.live)

    def _redis_up(self, back: bool) -> None:
        if back:
            self.limits.restore()
            self.mirror.reread_now()  # read the record again at once: what did we miss?
        # Grants made while the members could not see each other were made under the
        # fallback: the sync after an outage only looks (cluster.redis_limits).
        self.limits.rebaseline = False

    # --- the report ---------------------------------------------------------------------------

    async def report(self) -> dict[str, Any]:
        """The cluster report's `redis` part: read from what the last sync saw, never from
        Redis itself (a report must not wait on it either)."""
        members = self.membership.describe()
        return {
            "enabled": True,
            "member": self.member.id,
            **self.link.report(),
            "on_failure": self.settings.on_failure,
            "falling_back": self.limits.falling_back,
            "generation": self.overrides.generation,
            "live_members": self.membership.live,
            "spend_elsewhere": round(self.live.runtime.spend_elsewhere, 6),
            "hosts": hosts(members),
            "members": members,
        }
