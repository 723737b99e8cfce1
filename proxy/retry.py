"""Retry rules in one place: whether to try again, how long to wait, and the retry budget.

The backoff itself is aiohttp-retry's JitterRetry (exponential from `retry.delay`, plus a
random component); the first retry goes at once when it can go to a different backend, since
failing over needs no pause (nginx's proxy_next_upstream does the same).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

from aiohttp_retry import JitterRetry

from config.schema import RetryConfig
from proxy.upstream import Pool
from proxy.verdict import WORTH_ANOTHER_TRY, Verdict

DEFAULT_COOLDOWN = 1.0  # seconds without traffic after a 429 that gave no Retry-After
MAX_COOLDOWN = 300.0


class RetryBudget:
    """Retries may add at most `ratio` of the recent request rate, plus `min_per_second`
    (Finagle's RetryBudget): a failing fleet is not buried under its own retries, while a
    burst of failures from one dead backend among many still fails over completely.

    Requests are counted with one increment; the window only turns on the retry path.
    """

    __slots__ = (
        "ratio",
        "min_per_second",
        "window",
        "requests",
        "retries",
        "denied",
        "_clock",
        "_started",
        "_previous_requests",
        "_previous_retries",
    )

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.requests = 0
        self.retries = 0
        self.denied = 0
        self._clock = clock
        self._started = clock()
        self._previous_requests = 0
        self._previous_retries = 0

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget has room."""
        now = self._clock()
        elapsed = now - self._started
        if elapsed >= self.window:
            recent = elapsed < 2 * self.window
            self._previous_requests = self.requests if recent else 0
            self._previous_retries = self.retries if recent else 0
            self.requests = self.retries = 0
            self._started = now
        allowed = self.min_per_second * self.window + self.ratio * (
            self.requests + self._previous_requests
        )
        if self.retries + self._previous_retries >= allowed:
            self.denied += 1
            return False
        self.retries += 1
        return True


class RetryPolicy:
    __slots__ = ("max_attempts", "budget", "_backoff")

    def __init__(
        self,
        config: RetryConfig,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`budget`: the one a reload carries over (its window is kept, its ratios re-tuned)."""
        self.max_attempts = config.max_retries + 1
        if budget is None:
            budget = RetryBudget(config.budget_ratio, config.budget_min, clock=clock)
        else:
            budget.ratio = config.budget_ratio
            budget.min_per_second = float(config.budget_min)  # an int in the config
        self.budget = budget
        self._backoff = JitterRetry(
            attempts=config.max_retries,
            start_timeout=config.delay,
            max_timeout=config.max_delay,
            factor=2.0,
            random_interval_size=config.delay,
        )

    def should_retry(self, verdict: Verdict, attempt: int, pools: tuple[Pool, ...]) -> bool:
        """The retry rule, whole: only a verdict another backend might fix (THROTTLED,
        RETRYABLE), attempts left, somewhere live to go, and room in the retry budget
        (withdrawn last, so it is spent only when everything else allows the retry). The
        caller retries only while nothing has been sent to the client."""
        return (
            verdict in WORTH_ANOTHER_TRY
            and attempt < self.max_attempts
            and any(pool.has_live() for pool in pools)
            and self.budget.try_withdraw()
        )

    def backoff(self, retry_number: int, other_backend: bool) -> float:
        """Seconds to wait before retry number `retry_number` (1-based)."""
        if retry_number == 1 and other_backend:
            return 0.0
        return min(self._backoff.get_timeout(retry_number - 1), self._backoff._max_timeout)


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
