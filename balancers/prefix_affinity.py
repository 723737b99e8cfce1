"""Prefix affinity: consistent hashing with bounded load (Mirrokni et al., as HAProxy's
hash-balance-factor does), keyed on the session (X-Session-ID), the `user` field, or the first
characters of the prompt, so requests sharing a prefix land where it is likely cached.

No backend takes more than `load_factor` x the mean load; when the hashed backend is over its
bound or unavailable, the walk continues round the ring, and with no key at all the least
loaded backend serves.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Collection, Sequence
from typing import Any

from balancers.base import B, least_loaded
from balancers.request import RoutingRequest, StrategySettings

VIRTUAL_NODES = 100  # per backend: spreads each backend's share of the ring evenly


def ring_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class PrefixAffinity:
    __slots__ = ("_rng", "_points", "_owners", "_prefix", "_factor")
    uses_request = True

    def __init__(
        self, backends: Sequence[Any], rng: random.Random, settings: StrategySettings | None = None
    ) -> None:
        settings = settings or StrategySettings()
        self._rng = rng
        self._prefix = settings.affinity_prefix_chars
        self._factor = settings.affinity_load_factor
        ring = sorted(
            (ring_hash(f"{backend.name}#{replica}"), index)
            for index, backend in enumerate(backends)
            for replica in range(VIRTUAL_NODES)
        )
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]

    def key(self, request: RoutingRequest | None) -> str | None:
        if request is None:
            return None
        return request.affinity_key or (request.content[: self._prefix] or None)

    def select(
        self,
        backends: Sequence[B],
        exclude: Collection[B] = (),
        request: RoutingRequest | None = None,
    ) -> B | None:
        candidates = [b for b in backends if b.available() and b not in exclude]
        key = self.key(request)
        if not candidates or key is None or not self._points:
            return least_loaded(candidates, self._rng)
        total = sum(b.active for b in backends)
        bound = math.ceil(self._factor * (total + 1) / len(candidates))
        start = bisect.bisect(self._points, ring_hash(key))
        seen: set[int] = set()
        count = len(self._points)
        for step in range(count):
            index = self._owners[(start + step) % count]
            if index in seen:
                continue
            seen.add(index)
            backend = backends[index]
            if backend in candidates and backend.active + 1 <= bound:
                return backend
            if len(seen) == len(backends):
                break
        return least_loaded(candidates, self._rng)

    def home(self, backends: Sequence[B], request: RoutingRequest) -> B | None:
        """The backend the key hashes to, load and availability aside (for tests and the
        decision API's reasoning)."""
        key = self.key(request)
        if key is None or not self._points:
            return None
        start = bisect.bisect(self._points, ring_hash(key)) % len(self._points)
        return backends[self._owners[start]]
