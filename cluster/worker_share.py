"""One worker's part in the table its host's workers share (cluster.shared_table).

On the request path (bound to the runtime's parts, see proxy.shared_counts):
- in-flight counts, per backend and for the gateway: a worker publishes its own count with a
  store when it takes or gives back a slot, and reads the others' cells when it decides, so
  `max_concurrent` and `routing.max_concurrent_requests` hold for the gateway. The count is
  published before it is checked, so two workers racing for the last slot cannot both keep
  it; the README states the (zero) overshoot and the cost: one store and one read per worker
  on each side of a request.

Off the request path, every SYNC_INTERVAL (`run`):
- rate limits: each worker's buckets stand for the gateway's; what a worker granted is added
  to its cells, and what the others granted since the last sync is taken out of its buckets
  (`TokenBucket.settle`). Over-admission is bounded by what the other workers can grant in
  one interval;
- spend: each worker writes its own; the budget reads the sum;
- breaker and 429 hints: a backend another worker's breaker opened (or that answered 429 with
  a Retry-After) is avoided here too, until this worker's own half-open trial decides;
- the heartbeat and generation the cluster report shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from admission.ratelimit import TokenBucket
from cluster.shared_table import (
    COOLDOWN_UNTIL,
    COUNT,
    GENERATION,
    HEARTBEAT,
    IN_FLIGHT,
    OPEN_UNTIL,
    PID,
    SPEND,
    SPEND_PERIOD,
    SharedTable,
    client_slot,
)
from proxy.runtime import LiveRuntime, Runtime
from proxy.upstream import Upstream

log = logging.getLogger("request_router.workers")

SYNC_INTERVAL = 0.01  # seconds between syncs of limits, spend and hints
CLIENT_ACTIVE_WITHIN = 2.0  # client buckets used this recently are synced (Redis too)


class SharedCell:
    """This worker's cell of one count, and the same cell in every other worker's row."""

    __slots__ = ("_ints", "_own", "_others")

    def __init__(self, ints: memoryview, own: int, others: tuple[int, ...]) -> None:
        self._ints = ints
        self._own = own
        self._others = others

    def publish(self, value: int) -> None:
        self._ints[self._own] = value

    def elsewhere(self) -> int:
        ints = self._ints
        total = 0
        for cell in self._others:
            total += ints[cell]
        return total


class HintCells(NamedTuple):
    """One backend's breaker-open and cool-down cells: this worker's and the others'."""

    upstream: Upstream
    own_open: int
    others_open: tuple[int, ...]
    own_cool: int
    others_cool: tuple[int, ...]


@dataclass
class SyncedBucket:
    """A bucket and what the last sync saw: this worker's grants, the others' total."""

    bucket: TokenBucket
    own_cell: int
    other_cells: tuple[int, ...]
    granted_seen: int
    others_seen: int


class WorkerShare:
    """Implements proxy.shared_counts.Sharing for one worker."""

    def __init__(
        self,
        table: SharedTable,
        index: int,
        live: LiveRuntime,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.index = index
        self.live = live
        self.clock = clock
        self.generation = 0
        # With the redis: section on, every worker is a Redis member on its own and the Redis
        # sync settles limits and sums spend across all of them: doing it here as well would
        # take the sibling workers' grants out twice.
        self.sync_limits_and_spend = True
        ints, floats = table.ints, table.floats
        self._row = table.row_base(index)
        self._other_rows = tuple(r for r in range(table.rows) if r != index)
        # A restarted worker goes on from its predecessor's spend (its grants stay in the
        # table as they were, so nobody takes them out twice).
        self.spend_before = floats[self._row + SPEND]
        self.spend_before_period = ints[self._row + SPEND_PERIOD]
        ints[self._row + PID] = os.getpid()
        ints[self._row + IN_FLIGHT] = 0
        self._limits: dict[str, SyncedBucket] = {}
        self._clients: dict[str, SyncedBucket] = {}
        self._hints: dict[str, tuple[float, float]] = {}  # backend -> (open, cool-down) applied
        self._hint_cells: list[HintCells] = []  # set by bind

    # --- binding (at start and for every runtime a reload builds) -----------------------

    def _cell(self, column: int, field: int) -> tuple[int, tuple[int, ...]]:
        table = self.table
        return (
            table.key_cell(self.index, column, field),
            tuple(table.key_cell(r, column, field) for r in self._other_rows),
        )

    def bind(self, runtime: Runtime) -> None:
        ints = self.table.ints
        total = SharedCell(ints, self._row + IN_FLIGHT, self._others_head(IN_FLIGHT))
        runtime.admission.share(total)
        hint_cells = []
        for upstream in runtime.router.upstreams:
            column = self.table.column("backend:" + upstream.name)
            if upstream.shared_active is None:
                own, others = self._cell(column, COUNT)
                upstream.shared_active = SharedCell(ints, own, others)
                upstream.shared_active.publish(upstream.active)
            hint_cells.append(
                HintCells(
                    upstream, *self._cell(column, OPEN_UNTIL), *self._cell(column, COOLDOWN_UNTIL)
                )
            )
        # Where each backend's breaker and cool-down hints are: found once per runtime, read
        # every sync.
        self._hint_cells = hint_cells
        limits: dict[str, SyncedBucket] = {}
        for key, bucket in runtime.rate_limiter.shared_buckets():
            synced = self._limits.get(key)
            if synced is None or synced.bucket is not bucket:
                own, others = self._cell(self.table.column("limit:" + key), COUNT)
                # Grants made before this bucket existed are not its business.
                synced = SyncedBucket(bucket, own, others, bucket.admitted, self._sum(others))
            limits[key] = synced
        self._limits = limits
        self._clients = {
            key: synced
            for key, synced in self._clients.items()
            if runtime.rate_limiter.clients.get(key) is synced.bucket
        }

    def _others_head(self, field: int) -> tuple[int, ...]:
        return tuple(self.table.row_base(r) + field for r in self._other_rows)

    def _sum(self, cells: tuple[int, ...]) -> int:
        ints = self.table.ints
        return sum(ints[cell] for cell in cells)

    # --- the background sync --------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:  # never let a bad tick stop sharing for good
                log.exception("worker state sync failed")
            await asyncio.sleep(SYNC_INTERVAL)

    def sync(self) -> None:
        runtime = self.live.runtime
        if self.sync_limits_and_spend:
            self._sync_limits(runtime)
        self._sync_spend(runtime)
        self._sync_hints(runtime)
        floats, ints = self.table.floats, self.table.ints
        ints[self._row + GENERATION] = self.generation
        floats[self._row + HEARTBEAT] = time.time()

    def _settle(self, synced: SyncedBucket) -> None:
        ints = self.table.ints
        granted = synced.bucket.admitted
        if granted != synced.granted_seen:
            ints[synced.own_cell] += granted - synced.granted_seen
            synced.granted_seen = granted
        others = self._sum(synced.other_cells)
        synced.bucket.settle(others - synced.others_seen)
        synced.others_seen = others

    def _sync_limits(self, runtime: Runtime) -> None:
        for limit in self._limits.values():
            self._settle(limit)
        limiter = runtime.rate_limiter
        if not limiter.per_client_rps:
            return
        active = limiter.active_clients(CLIENT_ACTIVE_WITHIN)
        clients = self._clients
        for key, bucket in active:
            synced = clients.get(key)
            if synced is None or synced.bucket is not bucket:
                slot = client_slot(key)
                own = self.table.client_cell(self.index, slot)
                others = tuple(self.table.client_cell(r, slot) for r in self._other_rows)
                # What this bucket granted before it was synced is counted now.
                synced = SyncedBucket(bucket, own, others, 0, self._sum(others))
                clients[key] = synced
            self._settle(synced)
        if len(clients) > 2 * len(active) + 64:  # forget idle clients now and then
            keep = {key for key, _ in active}
            self._clients = {k: v for k, v in clients.items() if k in keep}

    def _sync_spend(self, runtime: Runtime) -> None:
        """Each row holds its worker's spend in a budget period, labelled with the period;
        the budget adds up the rows of the current one."""
        floats, ints = self.table.floats, self.table.ints
        own = runtime.period_spend()
        period = runtime.spend_period.key
        if self.spend_before_period == period:
            own += self.spend_before
        floats[self._row + SPEND] = own
        ints[self._row + SPEND_PERIOD] = period
        if not self.sync_limits_and_spend:
            return
        elsewhere = 0.0
        for r in self._other_rows:
            base = self.table.row_base(r)
            if ints[base + SPEND_PERIOD] == period:
                elsewhere += floats[base + SPEND]
        runtime.spend_elsewhere = elsewhere

    def _sync_hints(self, runtime: Runtime) -> None:
        floats = self.table.floats
        now = self.clock()
        for upstream, own_open, others_open, own_cool, others_cool in self._hint_cells:
            floats[own_open] = upstream.breaker.open_until()
            floats[own_cool] = upstream.cooldown_until
            opened = max((floats[c] for c in others_open), default=0.0)
            cooling = max((floats[c] for c in others_cool), default=0.0)
            applied_open, applied_cool = self._hints.get(upstream.name, (0.0, 0.0))
            if opened > now and opened > applied_open:
                self._hold_open(upstream, opened)
                applied_open = opened
            if cooling > now and cooling > applied_cool:
                upstream.cooldown_until = max(upstream.cooldown_until, cooling)
                applied_cool = cooling
            self._hints[upstream.name] = (applied_open, applied_cool)

    def _hold_open(self, upstream: Upstream, until: float) -> None:
        if upstream.breaker.open_until() < until:
            log.warning(
                "backend %s: avoided for %.1fs, another worker's breaker opened on it",
                upstream.name,
                until - self.clock(),
            )
            upstream.breaker.hold_open(until)

    # --- reporting ----------------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Every row of the table as the cluster report shows it."""
        ints, floats, table = self.table.ints, self.table.floats, self.table
        rows = []
        for r in range(table.rows):
            base = table.row_base(r)
            heartbeat = floats[base + HEARTBEAT]
            rows.append(
                {
                    "worker": r,
                    "pid": ints[base + PID] or None,
                    "alive": bool(ints[base + PID]) and time.time() - heartbeat < 2.0,
                    "generation": ints[base + GENERATION],
                    "last_sync_ms_ago": round((time.time() - heartbeat) * 1000, 1)
                    if heartbeat
                    else None,
                    "in_flight": ints[base + IN_FLIGHT],
                    "spend": round(floats[base + SPEND], 6),
                }
            )
        return rows
