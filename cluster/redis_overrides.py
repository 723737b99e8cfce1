"""The override record between members: a local change (strategy, reload) is published as a
versioned record, which Redis gives the next generation atomically (a Lua script) and
announces on a channel. The other members apply records with a newer generation: at once
from the channel, or from the re-read every second and on every (re)connection, which also
covers a missed message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import orjson
import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from cluster.overrides import OverrideRecord, OverrideStore, apply_overrides, current_state
from cluster.redis_keys import Keys
from proxy.runtime import LiveRuntime

log = logging.getLogger("request_router.redis")

REREAD_EVERY = 1.0  # seconds between re-reads of the override record

# The override record: KEYS record, channel; ARGV record (JSON), mode. Mode "bump" (a local
# change): stored with the next generation after the stored one's (or its own, if higher)
# and announced. Mode "newer": stored and announced only if Redis holds none or an older
# one. "read": only read. Returns the record Redis holds afterwards.
RECORD = """
local stored = redis.call('GET', KEYS[1])
if ARGV[2] == 'read' then return stored end
local record = cjson.decode(ARGV[1])
if stored then
  local current = cjson.decode(stored)
  if ARGV[2] == 'newer' and current.generation >= record.generation then return stored end
  if current.generation >= record.generation then record.generation = current.generation + 1 end
end
local encoded = cjson.encode(record)
redis.call('SET', KEYS[1], encoded)
redis.call('PUBLISH', KEYS[2], encoded)
return encoded
"""


class Queued(NamedTuple):
    """The record's part of one sync: its mode, and the local change it sends, if any."""

    mode: str
    sending: OverrideRecord | None


@dataclass(eq=False)
class OverrideMirror:
    """This host's record (cluster.overrides) kept in step with Redis's. `adopted`: called
    after a record from another member was applied (the worker table's generation follows
    it); `retry_after`: the channel listener's pause after a failure."""

    keys: Keys
    overrides: OverrideStore
    live: LiveRuntime
    adopted: Callable[[OverrideRecord], None]
    retry_after: float
    clock: Callable[[], float]
    # a local change not yet in Redis
    _pending: OverrideRecord | None = field(default=None, init=False)
    _reread_at: float = field(default=0.0, init=False)

    def publish(self, record: OverrideRecord) -> None:
        """A local change (OverrideStore.on_write): sent with the next sync, and again with
        every sync after it until Redis has it, so a change made during an outage is not lost
        (the last change wins)."""
        self._pending = record

    def reread_now(self) -> None:
        """Read the record again with the next sync (Redis is back: what did we miss?)."""
        self._reread_at = 0.0

    def queue(self, pipe: Pipeline) -> Queued | None:
        """Add the record's script to this sync's pipeline, if this sync has one."""
        record_mode = self._record_mode()
        if record_mode is None:
            return None
        mode, record = record_mode
        pipe.eval(RECORD, 2, self.keys.record, self.keys.channel, record, mode)
        return Queued(mode, self._pending)

    def read(self, queued: Queued, reply: Any) -> None:
        """The script's reply: the record Redis holds, adopted if newer."""
        if queued.mode == "bump" and self._pending is queued.sending:
            self._pending = None  # unless another change came meanwhile: that one goes next
        if reply is not None:
            self._adopt(reply)

    def _record_mode(self) -> tuple[str, bytes] | None:
        """What this sync does with the override record, if anything: publish a local
        change, re-read (putting ours back if Redis's is older or gone), or nothing."""
        if self._pending is not None:
            return "bump", orjson.dumps(self._pending.as_dict())
        if self.clock() < self._reread_at:
            return None
        self._reread_at = self.clock() + REREAD_EVERY
        own = self.overrides.read()
        if own is None:
            return "read", b"{}"
        # Redis restarted empty, or holds an older record than ours: ours goes (back) in.
        return "newer", orjson.dumps(own.as_dict())

    async def listen(self, client: redis.Redis) -> None:
        """Records announced on the channel, applied at once; reconnects after a failure
        (what it missed meanwhile, the periodic re-read brings)."""
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._adopt(message["data"])
            except (RedisError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.debug("redis channel: %r", exc)  # a bad record too: the re-read decides
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.retry_after)

    def _adopt(self, raw: Any) -> None:
        """A record from Redis: applied when its generation is newer than this host's."""
        record = OverrideRecord.from_dict(orjson.loads(raw))
        known = self.overrides.generation
        if record.generation < known:
            return
        if record.generation == known:  # this host has it (another worker wrote it)
            self.adopted(record)
            return
        runtime = self.live.runtime
        changed = apply_overrides(runtime.router, record)
        local = current_state(runtime.router, runtime.config)
        # Stored as this host now is (its own config digest: its file is what it reloads
        # from), under the record's generation.
        self.overrides.accept(replace(local, generation=record.generation))
        if changed:
            log.info(
                "runtime overrides from another gateway (generation %d): strategy %s,"
                " drained backends %s",
                record.generation,
                record.strategy,
                ", ".join(f"{k} ({v})" for k, v in record.backends.items()) or "none",
            )
        self.adopted(record)
