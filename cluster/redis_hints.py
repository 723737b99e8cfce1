"""Breaker and 429 hints between members: a breaker this member opened (or a 429's
cool-down) is published with its end in Redis's clock, and dropped when that has passed; the
others convert it to their monotonic clock and hold their own breaker open until then (their
own half-open trial decides afterwards)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proxy.runtime import Runtime

log = logging.getLogger("request_router.redis")

HINT_TOLERANCE = 0.05  # seconds: a hint no later than what a breaker holds already is an echo


class BreakerHints:
    """This member's hints going out and the others' coming in, across the two clocks."""

    def __init__(self, clock: Callable[[], float]) -> None:
        """`clock`: the monotonic clock the breakers read."""
        self.clock = clock
        self._redis_offset: float | None = None  # Redis's clock (s) minus our monotonic clock
        self._held: dict[str, tuple[float, float]] = {}  # backend -> hinted (open, cool-down)
        self.published = 0  # this member's own hints in the last sync

    def redis_time(self, redis_ms: float, at: float) -> None:
        """Redis's clock read `redis_ms` at `at` on ours (the middle of the round trip)."""
        self._redis_offset = redis_ms / 1000 - at

    def own(self, runtime: Runtime) -> dict[str, int]:
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
        self.published = len(hints)
        return hints

    def apply(self, runtime: Runtime, hints: dict[str, Any]) -> None:
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
