"""Prometheus metrics of the Redis sync, in a collector of their own that the composition
root adds to the app's registry (telemetry.prometheus builds it): read when Prometheus
scrapes, updated only by the background sync."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from telemetry.histogram import go_float

# A sync on one host's loopback takes ~0.3 ms; across a data centre a few ms; a stopped Redis
# takes the whole `redis.timeout`.
SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RedisMetrics(Collector):
    """router_redis_up, router_redis_errors_total, router_redis_sync_seconds."""

    def __init__(self) -> None:
        self.up = False
        self.errors = 0
        self.live_members = 0
        self._counts = [0] * (len(SYNC_BUCKETS) + 1)
        self._sum = 0.0

    def synced(self, seconds: float) -> None:
        """One sync's duration, whether it succeeded or not."""
        self._counts[bisect_left(SYNC_BUCKETS, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "router_redis_up", "1 while the last sync with Redis succeeded", value=int(self.up)
        )
        yield CounterMetricFamily(
            "router_redis_errors", "Syncs with Redis that failed or timed out", value=self.errors
        )
        yield GaugeMetricFamily(
            "router_redis_members",
            "Gateway members live in Redis at the last sync (this one included)",
            value=self.live_members,
        )
        bounds = [go_float(b) for b in SYNC_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "router_redis_sync_seconds",
            "Duration of one sync with Redis (one pipelined round trip)",
            buckets=list(zip(bounds, accumulate(self._counts), strict=True)),
            sum_value=self._sum,
        )
