"""Several gateway hosts behave as one: state shared through Redis (the `redis:` section).

Nothing here is on the request path. Every `redis.sync_interval` (100 ms) a background task
makes one pipelined round trip, and the request path reads only what the last one left in
process memory (token buckets, `runtime.spend_elsewhere`, breakers, the router's strategy).
Each worker process is a member on its own (host:port:worker:pid), so with several workers
the one-host table (cluster.worker_share) leaves limits and spend to this sync.

One sync is one Lua script (`SYNC`, with a single JSON reply, which costs the client far
less to parse than many small replies) and, now and then, the override record's:
- membership: a heartbeat into a sorted set scored with Redis's own clock (hosts' clocks
  may differ; Redis's is the one they share), with the member's host, port, pid, generation
  and totals; a member is live while its heartbeat is younger than `redis.member_ttl`;
- rate limits and spend: each member's running totals (absolute, so a repeated write counts
  once) in one hash per key, read back with the other members' (cluster.redis_limits);
  the others' spend becomes `runtime.spend_elsewhere`, so budgets hold across hosts within
  one interval;
- breaker and 429 hints: a breaker this member opened (or a 429's cool-down) is published
  with its end in Redis's clock, and dropped when that has passed; the others convert it to
  their monotonic clock and hold their own breaker open until then (their own half-open
  trial decides afterwards);
- overrides: a local change (strategy, reload) is published as a versioned record, which
  Redis gives the next generation atomically (a Lua script) and announces on a channel. The
  other members apply records with a newer generation: at once from the channel, or from
  the re-read every second and on every (re)connection, which also covers a missed message.

Redis down or slow never blocks start-up or a request: the client has short connect and
socket timeouts and no retries, a breaker (circuit.breaker) stops trying for
`redis.retry_after` after `redis.failure_threshold` failures in a row, and meanwhile limits
fall back as `redis.on_failure` says (cluster.redis_limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from circuit.breaker import CircuitBreaker, iso_utc
from cluster.overrides import OverrideRecord, OverrideStore, apply_strategies, current_state
from cluster.redis_limits import SharedLimits
from cluster.redis_metrics import RedisMetrics
from config.schema import RedisConfig
from proxy.runtime import LiveRuntime, Runtime

log = logging.getLogger("request_router.redis")

LIMIT_TTL_MS = 600_000  # a limit's hash outlives its last member by ten minutes
PERIOD_SPEND_TTL_MS = 40 * 86_400_000  # a period's spend hash outlives a month
REREAD_EVERY = 1.0  # seconds between re-reads of the override record
HINT_TOLERANCE = 0.05  # seconds: a hint no later than what a breaker holds already is an echo
FORGET_AFTER = 100  # member TTLs after which a silent member leaves the report

# One sync: KEYS members (sorted set), member info (hash), hints (hash), then one hash per
# running total (spend, each limit). ARGV: member id, its info (JSON), member TTL (ms), TTLs
# after which a silent member is forgotten, the member's hints (JSON: {field: until in
# Redis's ms}), then per total its value and the key's TTL in ms (0: none).
# - the heartbeat, scored with Redis's own clock (hosts' clocks may differ);
# - the totals: this member's field written, the others' returned;
# - hints: each kept if later than the one stored; those still running are returned, the
#   others removed, and the hash expires with the last one.
# One JSON reply: {now, members: [[id, last heartbeat, info]...], totals: [[field, value,
# ...] per total], hints: {field: until}} (an empty Lua table encodes as {}).
SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, member)
redis.call('HSET', KEYS[2], member, ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]) * ttl)
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local members = {}
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], now - 10 * ttl, '+inf', 'WITHSCORES')
for i = 1, #recent, 2 do
  members[#members + 1] = {recent[i], recent[i + 1], redis.call('HGET', KEYS[2], recent[i]) or '{}'}
end
for field, untl in pairs(cjson.decode(ARGV[5])) do
  local stored = tonumber(redis.call('HGET', KEYS[3], field) or '0')
  if untl > stored then redis.call('HSET', KEYS[3], field, untl) end
end
local hints = {}
local last = 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local untl = tonumber(all[i + 1])
  if untl > now then
    hints[all[i]] = all[i + 1]
    if untl > last then last = untl end
  else
    redis.call('HDEL', KEYS[3], all[i])
  end
end
if last > 0 then redis.call('PEXPIRE', KEYS[3], last - now) end
local totals = {}
for i = 4, #KEYS do
  local at = 6 + 2 * (i - 4)
  redis.call('HSET', KEYS[i], member, ARGV[at])
  if tonumber(ARGV[at + 1]) > 0 then redis.call('PEXPIRE', KEYS[i], ARGV[at + 1]) end
  local fields = redis.call('HGETALL', KEYS[i])
  local others = {}
  for j = 1, #fields, 2 do
    if fields[j] ~= member then
      others[#others + 1] = fields[j]
      others[#others + 1] = fields[j + 1]
    end
  end
  totals[#totals + 1] = others
end
return cjson.encode({now = now, members = members, totals = totals, hints = hints})
"""

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


@dataclass(frozen=True)
class Member:
    """Who this process is among the members: what the report shows of it."""

    host: str
    port: int
    worker: int
    pid: int

    @property
    def id(self) -> str:
        return f"{self.host}:{self.port}:{self.worker}:{self.pid}"

    @classmethod
    def this_process(cls, port: int, worker: int) -> Member:
        return cls(socket.gethostname(), port, worker, os.getpid())


class Keys:
    """Every key and channel, under the configured prefix."""

    def __init__(self, prefix: str) -> None:
        self.members = f"{prefix}:members"
        self.member_info = f"{prefix}:member-info"
        self.spend = f"{prefix}:spend"
        self.hints = f"{prefix}:hints"  # fields open:<backend>, cooldown:<backend>
        self.record = f"{prefix}:overrides"
        self.channel = f"{prefix}:overrides"
        self._prefix = prefix

    def limit(self, name: str) -> str:
        return f"{self._prefix}:limit:{name}"


def connect(settings: RedisConfig) -> redis.Redis:
    """A client that never waits long and never retries (redis-py retries by default): a
    failed sync is simply the next one's business. Maintenance notifications are off: they
    would relax the timeouts to 10 s while a managed Redis announces maintenance."""
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=0,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


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
        self.adopted = adopted
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        self.metrics = RedisMetrics()
        self.limits = SharedLimits()
        # Redis's own breaker: while open, no sync is attempted.
        self.breaker = CircuitBreaker(
            settings.failure_threshold,
            settings.retry_after,
            1,
            clock,
            max_recovery_time=settings.retry_after,
        )
        self.client: redis.Redis | None = None
        self.last_sync_seconds: float | None = None
        self.last_success: float | None = None  # wall clock
        self.live_members = 1
        self._redis_offset: float | None = None  # Redis's clock (s) minus our monotonic clock
        self._pending: OverrideRecord | None = None  # a local change not yet in Redis
        self._reread_at = 0.0
        self._held: dict[str, tuple[float, float]] = {}  # backend -> hinted (open, cool-down)
        self.published_hints = 0  # this member's own hints in the last sync
        self._seen: tuple[float, list[list[str]]] = (0.0, [])  # Redis's time, members
        overrides.on_write.append(self.publish)

    # --- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync every interval until cancelled; the channel listener runs beside it."""
        self.client = connect(self.settings)
        listener = asyncio.get_running_loop().create_task(self._listen())
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
        if not self.breaker.allows():
            self._fall_back()
            return
        self.breaker.on_dispatch()
        started = self.clock()
        try:
            # The socket timeouts bound each step; this bounds the whole, connect included.
            async with asyncio.timeout(2 * self.settings.timeout):
                await self._sync(self.live.runtime)
        except (RedisError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._failed(exc)
        else:
            self._succeeded()
        finally:
            self.last_sync_seconds = self.clock() - started
            self.metrics.synced(self.last_sync_seconds)

    async def _listen(self) -> None:
        """Records announced on the channel, applied at once; reconnects after a failure
        (what it missed meanwhile, the periodic re-read brings)."""
        assert self.client is not None
        while True:
            pubsub = self.client.pubsub()
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
            await asyncio.sleep(self.settings.retry_after)

    # --- one sync -----------------------------------------------------------------------------

    async def _sync(self, runtime: Runtime) -> None:
        assert self.client is not None
        keys = self.keys
        self.limits.track(runtime.rate_limiter)
        totals = self.limits.totals()
        # Spend is exchanged per budget period (proxy.budget_period): a new day or month is a
        # new hash, so members only add up the current period's running totals.
        own_spend = runtime.period_spend()
        period = runtime.spend_period
        spend_key = f"{keys.spend}:{period.key}" if period.key else keys.spend
        spend_ttl = PERIOD_SPEND_TTL_MS if period.key else 0
        exchanged = [spend_key, *(keys.limit(name) for name, _ in totals)]
        values: list[Any] = [repr(own_spend), spend_ttl]
        for _, granted in totals:
            values += [granted, LIMIT_TTL_MS]
        pipe = self.client.pipeline(transaction=False)
        pipe.eval(
            SYNC,
            3 + len(exchanged),
            keys.members,
            keys.member_info,
            keys.hints,
            *exchanged,
            self.member.id,
            orjson.dumps(self._info(runtime)),
            int(self.settings.member_ttl * 1000),
            FORGET_AFTER,
            orjson.dumps(self._own_hints(runtime)),
            *values,
        )
        record_mode = self._record_mode()
        sending = self._pending
        if record_mode is not None:
            mode, record = record_mode
            pipe.eval(RECORD, 2, keys.record, keys.channel, record, mode)
        sent = self.clock()
        replies = await pipe.execute()
        received = self.clock()
        reply = orjson.loads(replies[0])
        self._redis_offset = reply["now"] / 1000 - (sent + received) / 2
        self._read_members(reply["now"], reply["members"] or [])
        others = [_pairs(flat or []) for flat in reply["totals"]]
        runtime.spend_elsewhere = sum(float(v) for v in others[0].values())
        for (name, _), fields in zip(totals, others[1:], strict=True):
            self.limits.settle(name, {m: int(v) for m, v in fields.items()})
        self._apply_hints(runtime, reply["hints"] or {})
        if record_mode is not None:
            if record_mode[0] == "bump" and self._pending is sending:
                self._pending = None  # unless another change came meanwhile: that one goes next
            if replies[-1] is not None:
                self._adopt(replies[-1])

    def _info(self, runtime: Runtime) -> dict[str, Any]:
        telemetry = runtime.telemetry
        return {
            "host": self.member.host,
            "port": self.member.port,
            "worker": self.member.worker,
            "pid": self.member.pid,
            "generation": self.overrides.generation,
            "requests": telemetry.total,
            "spend": telemetry.cost_total,
            "tokens": sum(s.prompt_tokens + s.completion_tokens for s in telemetry.models.values()),
            "in_flight": runtime.admission.in_flight,
        }

    def _read_members(self, now_ms: float, members: list[list[str]]) -> None:
        """The members the sync saw: counted now (limits fall back by them), described
        when the report asks."""
        ttl_ms = self.settings.member_ttl * 1000
        self._seen = (now_ms, members)
        self.live_members = max(
            1, sum(1 for _, seen, _ in members if now_ms - float(seen) < ttl_ms)
        )
        self.metrics.live_members = self.live_members

    def describe_members(self) -> list[dict[str, Any]]:
        now_ms, members = self._seen
        ttl_ms = self.settings.member_ttl * 1000
        described = []
        for member, seen, raw in members:
            info = orjson.loads(raw)
            seen_ms = float(seen)
            described.append(
                {
                    "member": member,
                    **{k: info.get(k) for k in ("host", "port", "worker", "pid", "generation")},
                    "alive": now_ms - seen_ms < ttl_ms,
                    "last_heartbeat": iso_utc(seen_ms / 1000),
                    "last_heartbeat_ms_ago": round(now_ms - seen_ms),
                    **{k: info.get(k) for k in ("requests", "spend", "tokens", "in_flight")},
                }
            )
        return described

    # --- breaker and 429 hints ---------------------------------------------------------------

    def _own_hints(self, runtime: Runtime) -> dict[str, int]:
        """This member's own open breakers and cool-downs, as their end in Redis's clock (ms).
        Periods that only hold a hint from elsewhere are not sent back."""
        offset = self._redis_offset
        if offset is None:  # Redis's clock not known yet: the next sync sends them
            return {}
        hints = {}
        now = self.clock()
        for upstream in runtime.router.upstreams:
            held_open, held_cool = self._held.get(upstream.name, (0.0, 0.0))
            for kind, until, held in (
                ("open:", upstream.breaker.open_until(), held_open),
                ("cooldown:", upstream.cooldown_until, held_cool),
            ):
                if until > now and until > held + HINT_TOLERANCE:
                    hints[kind + upstream.name] = int((until + offset) * 1000)
        self.published_hints = len(hints)
        return hints

    def _apply_hints(self, runtime: Runtime, hints: dict[str, Any]) -> None:
        """The running hints of every member, converted to this member's monotonic clock:
        a breaker held open, a cool-down extended; this member's half-open trial decides
        after that."""
        offset = self._redis_offset
        assert offset is not None
        now = self.clock()
        for upstream in runtime.router.upstreams:
            opened = hints.get("open:" + upstream.name)
            cooling = hints.get("cooldown:" + upstream.name)
            if opened is None and cooling is None:
                continue
            held_open, held_cool = self._held.get(upstream.name, (0.0, 0.0))
            if opened is not None:
                until = float(opened) / 1000 - offset
                if until > now and until > upstream.breaker.open_until() + HINT_TOLERANCE:
                    log.warning(
                        "backend %s: avoided for %.1fs, a breaker on another gateway opened on it",
                        upstream.name,
                        until - now,
                    )
                    upstream.breaker.hold_open(until)
                    held_open = until
            if cooling is not None:
                until = float(cooling) / 1000 - offset
                if until > now and until > upstream.cooldown_until + HINT_TOLERANCE:
                    upstream.cooldown_until = until
                    held_cool = until
            self._held[upstream.name] = (held_open, held_cool)

    # --- overrides ----------------------------------------------------------------------------

    def publish(self, record: OverrideRecord) -> None:
        """A local change (OverrideStore.on_write): sent with the next sync, and again with
        every sync after it until Redis has it, so a change made during an outage is not lost
        (the last change wins)."""
        self._pending = record

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
        changed = apply_strategies(runtime.router, record)
        local = current_state(runtime.router, runtime.config)
        # Stored as this host now is (its own config digest: its file is what it reloads
        # from), under the record's generation.
        self.overrides.accept(dataclasses.replace(local, generation=record.generation))
        if changed:
            log.info(
                "strategy %s from another gateway (generation %d)",
                record.strategy,
                record.generation,
            )
        self.adopted(record)

    # --- outcomes -----------------------------------------------------------------------------

    def _succeeded(self) -> None:
        self.breaker.record_success()
        if not self.metrics.up:
            if self.metrics.errors:
                log.warning("redis: back after %d failed syncs", self.metrics.errors)
            self.limits.restore()
            self._reread_at = 0.0  # read the record again at once: what did we miss?
        # Grants made while the members could not see each other were made under the
        # fallback: the sync after an outage only looks (cluster.redis_limits).
        self.limits.rebaseline = False
        self.metrics.up = True
        self.last_success = time.time()

    def _failed(self, exc: BaseException) -> None:
        self.breaker.record_failure()
        self.metrics.errors += 1
        if self.metrics.up or self.metrics.errors == 1:
            log.warning(
                "redis: sync failed (%r); limits fall back to %s",
                exc,
                self.settings.on_failure,
            )
        self.metrics.up = False
        self._fall_back()

    def _fall_back(self) -> None:
        self.limits.rebaseline = True
        self.limits.track(self.live.runtime.rate_limiter)
        self.limits.fall_back(self.settings.on_failure, self.live_members)

    # --- the report ---------------------------------------------------------------------------

    async def report(self) -> dict[str, Any]:
        """The cluster report's `redis` part: read from what the last sync saw, never from
        Redis itself (a report must not wait on it either)."""
        members = self.describe_members()
        return {
            "enabled": True,
            "member": self.member.id,
            "up": self.metrics.up,
            "errors": self.metrics.errors,
            "breaker": self.breaker.state.value,
            "last_sync_ms": round(self.last_sync_seconds * 1000, 3)
            if self.last_sync_seconds is not None
            else None,
            "last_success": iso_utc(self.last_success),
            "on_failure": self.settings.on_failure,
            "falling_back": self.limits.falling_back,
            "generation": self.overrides.generation,
            "live_members": self.live_members,
            "spend_elsewhere": round(self.live.runtime.spend_elsewhere, 6),
            "hosts": hosts(members),
            "members": members,
        }


def hosts(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members grouped by gateway (host and port): its live workers, the newest
    generation among them, and their spend and requests added up."""
    grouped: dict[tuple[Any, Any], dict[str, Any]] = {}
    for member in members:
        key = (member["host"], member["port"])
        host = grouped.setdefault(
            key,
            {
                "host": member["host"],
                "port": member["port"],
                "live_workers": 0,
                "generation": 0,
                "last_heartbeat": None,
                "requests": 0,
                "spend": 0.0,
            },
        )
        host["live_workers"] += 1 if member["alive"] else 0
        host["generation"] = max(host["generation"], member["generation"] or 0)
        host["last_heartbeat"] = max(host["last_heartbeat"] or "", member["last_heartbeat"] or "")
        host["requests"] += member["requests"] or 0
        host["spend"] = round(host["spend"] + (member["spend"] or 0.0), 6)
    return list(grouped.values())
