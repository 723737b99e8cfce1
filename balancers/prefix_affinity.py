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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from balancers.base import B, Balancer, OptionalRequest, eligible, least_loaded
from balancers.registry import register
from balancers.request import RoutingRequest, StrategySettings
from balancers.settings import setting

VIRTUAL_NODES = 100  # per backend: spreads each backend's share of the ring evenly


def ring_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class AffinitySettings:
    affinity_prefix_chars: int = setting(
        256,
        minimum=1,
        help="prefix_affinity: characters of the prompt hashed when there is no session or user",
    )
    affinity_load_factor: float = setting(
        1.25, minimum=1.0, help="prefix_affinity: no backend above this x the mean load"
    )


@register("prefix_affinity", order=13)
class PrefixAffinity(Balancer):
    """The ring maps to positions in the pool, so this policy sees the whole pool (`select`)."""

    __slots__ = ("_points", "_owners", "_prefix", "_factor")
    uses_request = True
    settings_type = AffinitySettings

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        own = settings.of(AffinitySettings)
        self._prefix = own.affinity_prefix_chars
        self._factor = own.affinity_load_factor
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
        self, backends: Sequence[B], exclude: Collection[B] = (), request: OptionalRequest = None
    ) -> B | None:
        candidates = eligible(backends, exclude)
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
