"""Rate limits between gateway hosts: the bookkeeping of cluster.redis_sync, without Redis.

The design is the one-host table's (cluster.worker_share): every member keeps its local token
bucket, which stands for the whole gateway's; off the request path it publishes what it
granted and takes what the others granted out of its bucket (`TokenBucket.settle`, into debt
if need be). Over Redis, each limit key is a hash with one field per member holding that
member's *running total* of grants (never an increment), so a write that is repeated after a
timeout counts once, and a Redis that lost its data is refilled with the same totals.

A member takes out the growth of each other member's total since it last saw it. A member it
has not seen (one that joined, or that reappears after Redis restarted empty) and every
member after this one's own outage start from a new baseline: grants made while the members
could not see each other were made under the fallback's split limits (`fall_back`), and
taking them out afterwards would count them twice.

While Redis is unreachable (`redis.on_failure`):
- `local_share`: each bucket's rate and burst become the limit divided by the live members of
  the last successful sync (1 if there never was one), restored when Redis is back;
- `open`: each member enforces the limit as configured, on its own (the gateway may then admit
  up to members x the limit);
- `closed`: the buckets refuse everything (burst 0) until Redis is back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from admission.ratelimit import RateLimiter, TokenBucket
from cluster.worker_share import CLIENT_ACTIVE_WITHIN

# Client buckets used within CLIENT_ACTIVE_WITHIN are synced, the most recent first, at most
# this many per sync.
MAX_SYNCED_CLIENTS = 256


@dataclass
class SharedLimit:
    """One limit key between syncs."""

    bucket: TokenBucket
    admitted_seen: int  # bucket.admitted at the last sync
    rate: float  # the limit as configured, restored after a fallback
    capacity: float
    granted: int = 0  # this member's grants under this key, over its lifetime: what it publishes
    seen: dict[str, int] = field(default_factory=dict)  # other member -> its total, last sync
    fallen_back: bool = False


def client_limit_name(key: str) -> str:
    """A client's limit under a name of bounded length that every member derives the same
    way (the key itself may be an address or a client name of any length)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return "client:" + digest


class SharedLimits:
    """This member's limits, by the name every member gives them ("global", "model:<name>",
    "client:<hash>")."""

    def __init__(self) -> None:
        self.limits: dict[str, SharedLimit] = {}
        # Set after an outage: the next sync takes nothing out, it only looks.
        self.rebaseline = True

    def track(self, limiter: RateLimiter) -> None:
        """Bring the limits up to date with the runtime's limiter (a reload may have built a
        new one; clients come and go), counting what each bucket granted since the last
        sync. A key whose bucket was replaced keeps its running total, so it never goes
        back."""
        current = list(limiter.shared_buckets())
        if limiter.per_client_rps:
            active = limiter.active_clients(CLIENT_ACTIVE_WITHIN)[:MAX_SYNCED_CLIENTS]
            current += [(client_limit_name(key), bucket) for key, bucket in active]
        limits: dict[str, SharedLimit] = {}
        for name, bucket in current:
            limit = self.limits.get(name)
            if limit is None or limit.bucket is not bucket:
                fresh = SharedLimit(bucket, 0, bucket.rate, bucket.capacity)
                if limit is not None:
                    fresh.granted, fresh.seen = limit.granted, limit.seen
                limit = fresh
            limit.granted += bucket.admitted - limit.admitted_seen
            limit.admitted_seen = bucket.admitted
            limits[name] = limit
        for name, limit in self.limits.items():
            if limits.get(name) is not limit and limit.fallen_back:
                self._restore(limit)  # a bucket no longer synced keeps its configured limit
        self.limits = limits

    def totals(self) -> list[tuple[str, int]]:
        """What this member publishes: each limit's name and its running total of grants."""
        return [(name, limit.granted) for name, limit in self.limits.items()]

    def settle(self, name: str, others: dict[str, int]) -> int:
        """Take out of `name`'s bucket what the other members granted since the last sync;
        `others` is every other member's published total. Returns what was taken."""
        limit = self.limits.get(name)
        if limit is None:
            return 0
        taken = 0
        if not self.rebaseline:
            for member, total in others.items():
                before = limit.seen.get(member)
                if before is not None and total > before:
                    taken += total - before
        # A member missing now is forgotten: when it reappears it starts from a baseline.
        limit.seen = dict(others)
        limit.bucket.settle(taken)
        return taken

    def fall_back(self, mode: str, live_members: int) -> None:
        """Redis is unreachable: limits as `redis.on_failure` says (see the module's doc).
        Applied on every failed sync, so buckets made meanwhile (a new client, a reload)
        follow too."""
        if mode == "open":
            return
        share = max(1, live_members)
        for limit in self.limits.values():
            if limit.fallen_back:
                continue
            bucket = limit.bucket
            if mode == "closed":
                bucket.capacity = 0.0
            else:  # local_share
                bucket.rate = limit.rate / share
                bucket.capacity = max(1.0, limit.capacity / share)
            bucket.tokens = min(bucket.tokens, bucket.capacity)
            limit.fallen_back = True

    def restore(self) -> None:
        """Redis is back: every bucket has its configured limit again."""
        for limit in self.limits.values():
            if limit.fallen_back:
                self._restore(limit)

    @staticmethod
    def _restore(limit: SharedLimit) -> None:
        limit.bucket.rate = limit.rate
        limit.bucket.capacity = limit.capacity
        limit.fallen_back = False

    @property
    def falling_back(self) -> bool:
        return any(limit.fallen_back for limit in self.limits.values())
