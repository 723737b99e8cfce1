"""One sync's exchange, through one Lua script (`SYNC`, with a single JSON reply, which costs
the client far less to parse than many small replies):
- membership: this member's heartbeat, and the members seen (cluster.redis_members);
- rate limits and spend: each member's running totals (absolute, so a repeated write counts
  once) in one hash per key, read back with the other members' (cluster.redis_limits);
  the others' spend becomes `runtime.spend_elsewhere`, so budgets hold across hosts within
  one interval;
- breaker and 429 hints: this member's published, every member's applied
  (cluster.redis_hints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio.client import Pipeline

from cluster.overrides import OverrideStore
from cluster.redis_hints import BreakerHints
from cluster.redis_keys import Keys
from cluster.redis_limits import SharedLimits
from cluster.redis_members import Member, Membership, heartbeat
from proxy.runtime import Runtime

LIMIT_TTL_MS = 600_000  # a limit's hash outlives its last member by ten minutes
PERIOD_SPEND_TTL_MS = 40 * 86_400_000  # a period's spend hash outlives a month
FORGET_AFTER = 100  # member TTLs after which a silent member is deleted from Redis (the
# report lists members seen within the last 10 TTLs)

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


@dataclass(eq=False)
class SyncExchange:
    """What this member sends with each sync and what it takes from the reply."""

    member_ttl: float
    keys: Keys
    member: Member
    overrides: OverrideStore
    limits: SharedLimits
    membership: Membership
    hints: BreakerHints

    def queue(self, pipe: Pipeline, runtime: Runtime) -> list[str]:
        """Add the script to this sync's pipeline; returns the limits it exchanges."""
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
        pipe.eval(
            SYNC,
            3 + len(exchanged),
            keys.members,
            keys.member_info,
            keys.hints,
            *exchanged,
            self.member.id,
            orjson.dumps(heartbeat(self.member, self.overrides.generation, runtime)),
            int(self.member_ttl * 1000),
            FORGET_AFTER,
            orjson.dumps(self.hints.own(runtime)),
            *values,
        )
        return [name for name, _ in totals]

    def read(self, limits: list[str], raw: Any, at: float, runtime: Runtime) -> None:
        """The script's reply, received `at` (the middle of the round trip, on our clock)."""
        reply = orjson.loads(raw)
        self.hints.redis_time(reply["now"], at)
        self.membership.read(reply["now"], reply["members"] or [])
        others = [_pairs(flat or []) for flat in reply["totals"]]
        runtime.spend_elsewhere = sum(float(v) for v in others[0].values())
        for name, fields in zip(limits, others[1:], strict=True):
            self.limits.settle(name, {m: int(v) for m, v in fields.items()})
        self.hints.apply(runtime, reply["hints"] or {})
