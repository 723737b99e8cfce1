"""The dashboard's history, kept on the server: the last ten minutes, one point every two
seconds, in a bounded ring, so a page opened now draws its charts at once instead of
starting from nothing (issue 12).

A point is what happened in one interval: requests by status code, retries, failovers,
fallbacks, shed and rate-limited requests, refusals, each backend's requests (its share of its
pool), the queue and in-flight counts at the end of it, and the interval's latency
percentiles. It is sampled by a loop timer from counters the request path keeps anyway (a
few dictionary reads every two seconds, nothing per request), at wall-clock instants that are
multiples of the period, so the points of several workers fall on the same times and merge by
time (cluster.merge: counts add up; percentiles take the slowest worker's, never an average).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypedDict

from cluster.merge import Rule, Snapshot
from health.stats import SAMPLES, LatencyRing, percentile
from proxy.runtime import LiveRuntime, Runtime

HISTORY_PERIOD = 2.0  # seconds between points
HISTORY_POINTS = 300  # ten minutes of them
MODEL_BACKENDS = "models"  # every model backend is one distribution pool (telemetry.reports)
# Counters read at each tick; a point holds how much each rose in its interval.
EVENTS = (
    "retries",
    "failovers",
    "fallbacks",
    "shed",
    "rate_limited",
    "refused",
    "queue_rejected",
    "queue_timeouts",
    "client_closed",
)


class HistoryPoint(TypedDict):
    """One interval; annotations are merge rules (cluster.merge)."""

    requests: Annotated[int, "sum"]
    by_status: Annotated[dict[str, int], {"*": "sum"}]  # status code sent -> requests
    events: Annotated[dict[str, int], {"*": "sum"}]  # EVENTS -> how many in the interval
    backends: Annotated[dict[str, int], {"*": "sum"}]  # backend -> requests sent to it
    queued: Annotated[int, "sum"]  # at the end of the interval
    in_flight: Annotated[int, "sum"]
    p50_ms: Annotated[float | None, "max"]  # of the requests finished in the interval
    p99_ms: Annotated[float | None, "max"]
    ttft_ms: Annotated[float | None, "max"]  # mean time to first token, streams only


HISTORY_MERGE = {
    "period_s": Rule.FIRST,
    "points": {"*": HistoryPoint},  # by the interval's end, seconds since the epoch
    "pools": {"*": Rule.FIRST},  # backend -> its distribution pool
}


class Reading:
    """The cumulative counters at one tick; a point is the difference of two readings."""

    __slots__ = ("requests", "by_status", "events", "backends", "ttft_at")

    def __init__(self, runtime: Runtime) -> None:
        telemetry = runtime.telemetry
        admission = runtime.admission
        stats = runtime.stats
        self.requests = telemetry.total
        self.by_status = dict(telemetry.statuses)
        self.events = {
            "retries": stats.retries,
            "failovers": telemetry.failovers,
            "fallbacks": stats.fallbacks,
            "shed": runtime.shedder.shed,
            "rate_limited": runtime.rate_limiter.limited,
            "refused": sum(telemetry.refused.values()),
            "queue_rejected": admission.rejected_full,
            "queue_timeouts": admission.timed_out,
            "client_closed": stats.client_closed,
        }
        self.backends = {u.name: u.requests for u in runtime.router.upstreams}
        self.ttft_at = (telemetry.ttft.next, telemetry.ttft.count)


def rise(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """How much each counter rose; a counter that fell was replaced (a reload's new
    backend), so all of it is new."""
    rises = {}
    for key, value in now.items():
        previous = before.get(key, 0)
        rises[key] = value - previous if value >= previous else value
    return rises


def added_since(ring: LatencyRing, at: tuple[int, int]) -> int:
    """How many values `ring` took since it stood at `at` (its next slot and count). Once the
    ring is full, only modulo its size: a ring that went exactly round reads as unchanged."""
    next_before, count_before = at
    if ring.count < SAMPLES:
        return ring.count - count_before
    return (ring.next - next_before) % SAMPLES


def last_values(ring: LatencyRing, added: int) -> list[float]:
    """The `added` values `ring` took last (at most its size), oldest first."""
    added = min(added, ring.count)
    if added <= 0:
        return []
    end = ring.next
    if added <= end:
        return ring.values[end - added : end]
    return ring.values[SAMPLES - (added - end) :] + ring.values[:end]


def point_of(runtime: Runtime, now: Reading, before: Reading) -> HistoryPoint:
    telemetry = runtime.telemetry
    finished = now.requests - before.requests
    # Every finished request adds one latency; only streams add a TTFT.
    latency = last_values(telemetry.latency, finished)
    ttft = last_values(telemetry.ttft, min(finished, added_since(telemetry.ttft, before.ttft_at)))
    point: HistoryPoint = {
        "requests": finished,
        "by_status": {},
        "events": rise(now.events, before.events),
        "backends": rise(now.backends, before.backends),
        "queued": runtime.admission.queued,
        "in_flight": runtime.admission.in_flight,
        "p50_ms": None,
        "p99_ms": None,
        "ttft_ms": round(sum(ttft) / len(ttft) * 1000, 3) if ttft else None,
    }
    for code, count in now.by_status.items():
        rose = count - before.by_status.get(code, 0)
        if rose:
            point["by_status"][str(code)] = rose
    if latency:
        point["p50_ms"] = round(percentile(latency, 0.5) * 1000, 3)
        point["p99_ms"] = round(percentile(latency, 0.99) * 1000, 3)
    return point


class History:
    """The ring of points, and the timer that fills it."""

    def __init__(
        self,
        live: LiveRuntime,
        clock: Callable[[], float] = time.time,
        period: float = HISTORY_PERIOD,
        points: int = HISTORY_POINTS,
    ) -> None:
        self.live = live
        self.clock = clock
        self.period = period
        self.points: deque[tuple[int, HistoryPoint]] = deque(maxlen=points)
        self.last: Reading | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<History {len(self.points)} points every {self.period:g}s>"

    def sample(self) -> None:
        """Close the interval that ends now (a point, but for the very first reading)."""
        runtime = self.live.runtime
        reading = Reading(runtime)
        if self.last is not None:
            end = round(self.clock() / self.period) * self.period
            self.points.append((int(end), point_of(runtime, reading, self.last)))
        self.last = reading

    def start(self) -> None:
        """Arm the timer on the running loop (once). It holds the history weakly: when the
        app that owns it is gone, the timer stops re-arming itself."""
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self.sample()
        _arm(loop, weakref.ref(self))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def snapshot(self) -> Snapshot:
        if self._timer is None:
            self.start()  # read on the loop: the app was built before it ran
        pools = {
            u.name: MODEL_BACKENDS if u.model is not None else u.pool
            for u in self.live.runtime.router.upstreams
        }
        return {
            "period_s": self.period,
            "points": {str(end): point for end, point in self.points},
            "pools": pools,
        }


def _arm(loop: asyncio.AbstractEventLoop, ref: weakref.ref[History]) -> None:
    history = ref()
    if history is None:
        return
    wall = history.clock()
    delay = history.period - wall % history.period  # to the next multiple of the period
    if delay < history.period / 10:  # woke a hair early: skip to the next instant
        delay += history.period
    history._timer = loop.call_later(delay, _tick, loop, ref)


def _tick(loop: asyncio.AbstractEventLoop, ref: weakref.ref[History]) -> None:
    history = ref()
    if history is None:
        return
    history.sample()
    del history
    _arm(loop, ref)


def per_second(values: Iterable[int], period: float) -> list[float]:
    return [round(value / period, 3) for value in values]


def render_history(snapshot: Snapshot) -> dict[str, Any]:
    """Columns for the dashboard's charts: one value per point, oldest first; counts as rates
    per second; each backend's share (in %) of its pool's requests in the interval (null
    when the pool had none)."""
    period: float = snapshot["period_s"] or HISTORY_PERIOD
    points: dict[str, HistoryPoint] = snapshot["points"] or {}
    ends = sorted(points, key=int)
    rows = [points[end] for end in ends]
    codes = sorted({code for row in rows for code in row["by_status"]})
    pools: dict[str, str] = snapshot["pools"] or {}
    members: dict[str, list[str]] = {}
    for backend, pool in pools.items():
        members.setdefault(pool, []).append(backend)
    shares: dict[str, dict[str, list[float | None]]] = {}
    for pool, backends in members.items():
        shares[pool] = {backend: [] for backend in backends}
        for row in rows:
            total = sum(row["backends"].get(backend, 0) for backend in backends)
            for backend in backends:
                served = row["backends"].get(backend, 0)
                shares[pool][backend].append(round(served / total * 100, 1) if total else None)
    errors = [sum(n for code, n in row["by_status"].items() if int(code) >= 400) for row in rows]
    return {
        "period_s": period,
        "t": [int(end) for end in ends],
        "requests_per_second": per_second((row["requests"] for row in rows), period),
        "errors_per_second": per_second(errors, period),
        "status_per_second": {
            code: per_second((row["by_status"].get(code, 0) for row in rows), period)
            for code in codes
        },
        "events_per_second": {
            event: per_second((row["events"].get(event, 0) for row in rows), period)
            for event in EVENTS
        },
        "queued": [row["queued"] for row in rows],
        "in_flight": [row["in_flight"] for row in rows],
        "p50_ms": [row["p50_ms"] for row in rows],
        "p99_ms": [row["p99_ms"] for row in rows],
        "ttft_ms": [row["ttft_ms"] for row in rows],
        "shares": shares,
    }
