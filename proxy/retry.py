"""Retry rules in one place: what may be retried, how long to wait, and the retry budget.

The backoff itself is aiohttp-retry's JitterRetry (exponential from `retry.delay`, plus a
random component); the first retry goes at once when it can go to a different backend, since
failing over needs no pause (nginx's proxy_next_upstream does the same).
"""

from __future__ import annotations

import email.utils
import time

from aiohttp_retry import JitterRetry

from proxy.config import RetryConfig

# Statuses that say "not now, not here" rather than "your request is wrong".
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_COOLDOWN = 1.0  # seconds without traffic after a 429 that gave no Retry-After
MAX_COOLDOWN = 300.0


class RetryPolicy:
    """Also the retry budget: retries running at once stay under max(budget_min,
    budget_ratio x requests in flight), so a failing fleet does not multiply its own load
    (Envoy's retry budget)."""

    __slots__ = ("max_attempts", "budget_ratio", "budget_min", "retrying", "_backoff")

    def __init__(self, config: RetryConfig) -> None:
        self.max_attempts = config.max_retries + 1
        self.budget_ratio = config.budget_ratio
        self.budget_min = config.budget_min
        self.retrying = 0
        self._backoff = JitterRetry(
            attempts=config.max_retries,
            start_timeout=config.delay,
            max_timeout=config.max_delay,
            factor=2.0,
            random_interval_size=config.delay,
        )

    def backoff(self, retry_number: int, other_backend: bool) -> float:
        """Seconds to wait before retry number `retry_number` (1-based)."""
        if retry_number == 1 and other_backend:
            return 0.0
        return min(self._backoff.get_timeout(retry_number - 1), self._backoff._max_timeout)

    def budget_allows(self, in_flight: int) -> bool:
        return self.retrying < max(self.budget_min, self.budget_ratio * in_flight)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds from now: delta-seconds or an HTTP-date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_COOLDOWN))
