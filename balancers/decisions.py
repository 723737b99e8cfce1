"""Bookkeeping around routing decisions: how long they take, how many each strategy made,
and a small cache for strategies whose model choice depends only on the request.

The cache maps a request fingerprint to the chosen model for `ttl` seconds (LRU, bounded).
Any change of a backend's health or breaker state bumps `generation`, which is part of the
key, so every cached decision is dropped at once.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from health.stats import LatencyRing


class DecisionStats:
    __slots__ = ("count", "by_strategy", "durations", "cache_hits", "cache_misses", "generation")

    def __init__(self) -> None:
        self.count = 0
        self.by_strategy: Counter[str] = Counter()
        self.durations = LatencyRing()  # seconds per decision
        self.cache_hits = 0
        self.cache_misses = 0
        self.generation = 0

    def invalidate(self) -> None:
        self.generation += 1

    def record(self, strategy: str, seconds: float) -> None:
        self.count += 1
        self.by_strategy[strategy] += 1
        self.durations.add(seconds)


class DecisionCache:
    __slots__ = ("ttl", "size", "_entries", "_clock")

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[tuple[object, ...], tuple[str, float]] = OrderedDict()
        self._clock = clock

    def get(self, key: tuple[object, ...]) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        model, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return model

    def put(self, key: tuple[object, ...], model: str) -> None:
        self._entries[key] = (model, self._clock() + self.ttl)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
