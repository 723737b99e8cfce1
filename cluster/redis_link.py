"""The connection to Redis and whether it is up: a client that never waits long, the
breaker that stops trying, and what a sync's success or failure switches (cluster.redis_sync).

Redis down or slow never blocks start-up or a request: the client has short connect and
socket timeouts and no retries, a breaker (circuit.breaker) stops trying for
`redis.retry_after` after `redis.failure_threshold` failures in a row, and meanwhile limits
fall back as `redis.on_failure` says (cluster.redis_limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from circuit.breaker import CircuitBreaker, iso_utc
from cluster.redis_metrics import RedisMetrics
from config.schema import RedisConfig

log = logging.getLogger("request_router.redis")


def connect(settings: RedisConfig) -> redis.Redis:
    """A client that never waits long and never retries (redis-py retries by default): a
    failed sync is simply the next one's business. Maintenance notifications are off: they
    would relax the timeouts to 10 s while a managed Redis announces maintenance."""
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=0,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


class RedisLink:
    """Redis up or down, as the syncs find it: its breaker, the errors and timings the
    report and the metrics show, and the switch between shared and fallback limits."""

    def __init__(
        self,
        settings: RedisConfig,
        on_down: Callable[[], None],
        on_up: Callable[[bool], None],
        clock: Callable[[], float],
    ) -> None:
        """`on_down`: called after every failed sync and instead of every sync the breaker
        holds back; `on_up`: after every successful one, with True when Redis was down (or
        never reached) until then."""
        self.settings = settings
        self.on_down = on_down
        self.on_up = on_up
        self.clock = clock
        self.metrics = RedisMetrics()
        self.failed_in_a_row = 0  # syncs failed since the last success
        # Redis's own breaker: while open, no sync is attempted.
        self.breaker = CircuitBreaker(
            settings.failure_threshold,
            settings.retry_after,
            1,
            clock,
            max_recovery_time=settings.retry_after,
        )
        self.last_sync_seconds: float | None = None
        self.last_success: float | None = None  # wall clock

    async def attempt(self, sync: Callable[[], Awaitable[None]]) -> None:
        """One sync, or the fallback while Redis's breaker is open."""
        if not self.breaker.allows():
            self.on_down()
            return
        self.breaker.on_dispatch()
        started = self.clock()
        try:
            # The socket timeouts bound each step; this bounds the whole, connect included.
            async with asyncio.timeout(2 * self.settings.timeout):
                await sync()
        except (RedisError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._failed(exc)
        else:
            self._succeeded()
        finally:
            self.last_sync_seconds = self.clock() - started
            self.metrics.synced(self.last_sync_seconds)

    def _succeeded(self) -> None:
        self.breaker.record_success()
        back = not self.metrics.up
        if back and self.failed_in_a_row:
            log.warning("redis: back after %d failed syncs", self.failed_in_a_row)
        self.failed_in_a_row = 0
        self.on_up(back)
        self.metrics.up = True
        self.last_success = time.time()

    def _failed(self, exc: BaseException) -> None:
        self.breaker.record_failure()
        self.metrics.errors += 1
        self.failed_in_a_row += 1
        if self.metrics.up or self.metrics.errors == 1:
            log.warning(
                "redis: sync failed (%r); limits fall back to %s",
                exc,
                self.settings.on_failure,
            )
        self.metrics.up = False
        self.on_down()

    def report(self) -> dict[str, Any]:
        """The link's part of the cluster report."""
        return {
            "up": self.metrics.up,
            "errors": self.metrics.errors,
            "breaker": self.breaker.state.value,
            "last_sync_ms": round(self.last_sync_seconds * 1000, 3)
            if self.last_sync_seconds is not None
            else None,
            "last_success": iso_utc(self.last_success),
        }
