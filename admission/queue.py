"""Admission: per-backend and global concurrency caps, and a bounded queue in front of them.

HAProxy is the model: a request that finds no backend with a free slot waits in a bounded queue
(ordered by priority, then arrival) and is handed to whichever eligible backend frees a slot
first. A full queue answers at once with a Retry-After computed from the measured drain rate.

A slot is taken here (`Upstream.active`, `in_flight`) at dispatch and given back by `release`
when the response's last byte has gone, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Collection

from admission.snapshot import AdmissionSnapshot
from balancers.request import RoutingRequest
from proxy.errors import QueueFull, QueueTimeout
from proxy.shared_counts import SharedCount
from proxy.upstream import Pool, Upstream

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
NORMAL_PRIORITY = PRIORITIES["normal"]
# While requests wait, re-check every so often: backends also come back without releasing a
# slot (a breaker turning half-open, a Retry-After passing, a health check succeeding).
RECHECK_INTERVAL = 0.1
# With several workers a slot another worker frees wakes nobody here: re-check sooner.
SHARED_RECHECK_INTERVAL = 0.01
DRAIN_WINDOW = 10.0  # seconds of history behind the drain rate used for Retry-After


class Waiter:
    __slots__ = ("pools", "exclude", "request", "priority", "seq", "future", "gone", "own_first")

    def __init__(
        self,
        pools: tuple[Pool, ...],
        exclude: Collection[Upstream],
        request: RoutingRequest | None,
        priority: int,
        seq: int,
        future: asyncio.Future[Upstream],
        own_first: bool = False,
    ) -> None:
        self.pools = pools
        # The later pools (a fallback chain) only while the first has no live backend.
        self.own_first = own_first
        self.exclude = exclude
        self.request = request
        self.priority = priority
        self.seq = seq
        self.future = future
        self.gone = False

    def __lt__(self, other: Waiter) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class Admission:
    def __init__(
        self,
        max_in_flight: int,
        queue_size: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        # With several workers, the gateway-wide in-flight count (cluster binds it).
        self.shared_in_flight: SharedCount | None = None
        self.recheck_interval = RECHECK_INTERVAL
        self.queued = 0
        self.completed = 0
        self.rejected_full = 0
        self.timed_out = 0
        self.abandoned = 0
        self._clock = clock
        self._heap: list[Waiter] = []
        self._seq = itertools.count()
        self._recheck: asyncio.TimerHandle | None = None
        self._drain_mark = (clock(), 0)
        self._drain_rate = 0.0

    def resize(self, max_in_flight: int, queue_size: int, queue_timeout: float) -> None:
        """New limits from a reload; requests in flight and waiting keep their places."""
        self.max_in_flight = max_in_flight
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        if self.queued:
            self._dispatch()  # a higher limit may free slots for waiting requests now

    def __repr__(self) -> str:
        return (
            f"<Admission {self.in_flight} in flight of {self.max_in_flight},"
            f" {self.queued} queued of {self.queue_size}>"
        )

    # --- taking and giving back slots -------------------------------------------------------

    def share(self, in_flight: SharedCount) -> None:
        """Count in-flight requests across workers from now on (cluster binds it)."""
        self.shared_in_flight = in_flight
        in_flight.publish(self.in_flight)
        self.recheck_interval = SHARED_RECHECK_INTERVAL

    def has_room(self) -> bool:
        """Below routing.max_concurrent_requests, counting every worker's requests."""
        shared = self.shared_in_flight
        if shared is None:
            return self.in_flight < self.max_in_flight
        return self.in_flight + shared.elsewhere() < self.max_in_flight

    def try_acquire(
        self,
        pool: Pool,
        exclude: Collection[Upstream] = (),
        request: RoutingRequest | None = None,
    ) -> Upstream | None:
        """A backend slot now, or None; never jumps ahead of requests already queued."""
        if self.queued or not self.has_room():
            return None
        upstream = pool.select(exclude, request)
        if upstream is not None and not self._take(upstream):
            return None
        return upstream

    def take(self, upstream: Upstream) -> bool:
        """A slot on this very backend now (a copy of a write to every replica), whether or
        not requests are queued; False when it or the gateway is full."""
        return self.has_room() and upstream.available() and self._take(upstream)

    def _take(self, upstream: Upstream) -> bool:
        """Count the request in flight, gateway-wide and on its backend; False when another
        worker took the last slot at the same moment (nothing is counted then)."""
        self.in_flight += 1
        shared = self.shared_in_flight
        if shared is not None:
            shared.publish(self.in_flight)
            if self.in_flight + shared.elsewhere() > self.max_in_flight:
                self._count_out()
                return False
        if not upstream.take_slot():
            self._count_out()
            return False
        upstream.requests += 1
        upstream.breaker.on_dispatch()
        return True

    def _count_out(self) -> None:
        self.in_flight -= 1
        if self.shared_in_flight is not None:
            self.shared_in_flight.publish(self.in_flight)

    def release(self, upstream: Upstream) -> None:
        self._count_out()
        upstream.give_back_slot()
        self.completed += 1
        if self.queued:
            self._dispatch()

    async def wait(
        self,
        pools: tuple[Pool, ...],
        exclude: Collection[Upstream],
        priority: int = NORMAL_PRIORITY,
        request: RoutingRequest | None = None,
        own_first: bool = False,
    ) -> Upstream:
        """Queue for the first free slot on any of `pools` (in order of preference); with
        `own_first`, on the later pools only while the first has no live backend."""
        if self.queued >= self.queue_size:
            self.rejected_full += 1
            raise QueueFull(
                f"request queue is full ({self.queue_size} waiting)",
                headers={"Retry-After": str(self.retry_after())},
            )
        future: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        waiter = Waiter(pools, exclude, request, priority, next(self._seq), future, own_first)
        heapq.heappush(self._heap, waiter)
        self.queued += 1
        self._dispatch()  # a slot may be free already (e.g. only fairness made us queue)
        self._schedule_recheck()
        try:
            async with asyncio.timeout(self.queue_timeout):
                return await future
        except TimeoutError:
            self.timed_out += 1
            raise QueueTimeout(
                f"no backend slot came free within the queue timeout of {self.queue_timeout:g}s",
                headers={"Retry-After": str(self.retry_after())},
            ) from None
        except asyncio.CancelledError:
            # The client went away while queued. If a slot was handed over at the same
            # moment, give it straight back.
            self.abandoned += 1
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise
        finally:
            if not waiter.gone:
                waiter.gone = True
                self.queued -= 1

    def _dispatch(self) -> None:
        heap = self._heap
        blocked: list[Waiter] = []
        while heap and self.has_room():
            waiter = heapq.heappop(heap)
            if waiter.gone or waiter.future.done():
                continue
            upstream = None
            pools = waiter.pools
            if waiter.own_first and pools[0].has_live(waiter.exclude):
                pools = pools[:1]
            for pool in pools:
                upstream = pool.select(waiter.exclude, waiter.request)
                if upstream is not None:
                    break
            if upstream is None or not self._take(upstream):
                blocked.append(waiter)
                continue
            waiter.gone = True
            self.queued -= 1
            waiter.future.set_result(upstream)
        for waiter in blocked:
            heapq.heappush(heap, waiter)

    def _schedule_recheck(self) -> None:
        if self._recheck is None and self.queued:
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(self.recheck_interval, self._on_recheck)

    def _on_recheck(self) -> None:
        self._recheck = None
        if self.queued:
            self._dispatch()
            self._schedule_recheck()
        else:
            self._heap = [w for w in self._heap if not w.gone]

    # --- reporting ----------------------------------------------------------------------------

    def drain_rate(self) -> float:
        """Requests completed per second, measured over the last DRAIN_WINDOW seconds."""
        now = self._clock()
        since, completed = self._drain_mark
        elapsed = now - since
        if elapsed >= DRAIN_WINDOW or (elapsed > 0.5 and self._drain_rate == 0.0):
            self._drain_rate = (self.completed - completed) / elapsed
            self._drain_mark = (now, self.completed)
        return self._drain_rate

    def retry_after(self) -> int:
        """Seconds until the queue ahead would have drained at the measured rate (1..60)."""
        rate = self.drain_rate()
        if rate <= 0:
            return max(1, min(60, math.ceil(self.queue_timeout)))
        return max(1, min(60, math.ceil((self.queued + 1) / rate)))

    def snapshot(self) -> AdmissionSnapshot:
        """The queue's one JSON shape (its `__repr__` is the short form)."""
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "queued": self.queued,
            "queue_size": self.queue_size,
            "drain_rate_per_s": round(self.drain_rate(), 3),
            "rejected_full": self.rejected_full,
            "timed_out": self.timed_out,
            "abandoned": self.abandoned,
        }
