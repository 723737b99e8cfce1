"""Load shedding: refuse early, with 503 + Retry-After, when taking more work would only make
things worse. A backend that is down is not overload: its breaker and health checks deal with
it, and the other pools must keep serving. Three signals, each cheap on the request path:

- requests in flight + queued at `max_pending` (the whole gateway is saturated);
- fewer than `min_healthy_backends` healthy backends in the whole gateway (off by default);
- per pool, admission control as Envoy's admission_control filter and the client-side
  throttling of Google's SRE book do it: from the requests of the last `failure_window`
  seconds that reached a backend, and how many succeeded, a rejection probability

      p = (requests - successes / (1 - max_failure_rate)) / (requests + 1)

  capped at `max_rejection_probability` (never 100%: some traffic always probes recovery)
  and 0 until the window holds `min_requests`. Only backend answers count (proxy.verdict:
  OK and CLIENT_ERROR succeed, THROTTLED, RETRYABLE and BACKEND_FAILED fail); the gateway's
  own fast refusals (no backend, open breaker, queue, shed, rate limit) and clients that
  left are no evidence of overload. A pool with a half-open breaker is never shed, so its
  trial requests get through. A pool whose latest bucket (a tenth of the window; the one
  before while the current holds fewer than RECOVERY_SAMPLE answers) has its answers within
  the allowed failure rate has recovered: it is not shed on the strength of older failures,
  so the end of a fault is felt within a bucket or two rather than after the whole window
  (with several workers, each judging its own share of the traffic, the one that saw most of
  a fault would otherwise keep shedding longest).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from admission.queue import Admission
from circuit.breaker import BreakerState
from config.schema import LoadSheddingConfig
from proxy.errors import Shed
from proxy.router import Router
from proxy.upstream import Pool
from proxy.verdict import ADMISSION_FAILURES, ADMISSION_SUCCESSES, Verdict

WINDOW_BUCKETS = 10  # the window slides a tenth at a time
RECOVERY_SAMPLE = 5  # answers in the last two buckets that can show a pool has recovered


class PoolWindow:
    """Requests that reached a backend and those that succeeded, over the last `window`
    seconds, in WINDOW_BUCKETS buckets: old outcomes leave a tenth at a time, so the rejection
    probability falls smoothly once a fault ends."""

    __slots__ = ("requests", "successes", "_requests", "_successes", "_width", "_bucket")

    def __init__(self, window: float, now: float) -> None:
        self.requests = 0
        self.successes = 0
        self._requests = [0] * WINDOW_BUCKETS
        self._successes = [0] * WINDOW_BUCKETS
        self._width = window / WINDOW_BUCKETS
        self._bucket = int(now / self._width)

    def add(self, ok: bool, now: float) -> None:
        bucket = int(now / self._width)
        if bucket != self._bucket:
            self._advance(now)
        index = bucket % WINDOW_BUCKETS
        self._requests[index] += 1
        self.requests += 1
        if ok:
            self._successes[index] += 1
            self.successes += 1

    def totals(self, now: float) -> tuple[int, int]:
        self._advance(now)
        return self.requests, self.successes

    def latest(self, now: float, enough: int) -> tuple[int, int]:
        """Requests and successes of the current bucket, or of the one before it while the
        current holds fewer than `enough`."""
        index = self._advance(now)
        if self._requests[index] < enough:
            index = (index - 1) % WINDOW_BUCKETS
        return self._requests[index], self._successes[index]

    def _advance(self, now: float) -> int:
        bucket = int(now / self._width)
        if bucket != self._bucket:
            for step in range(1, min(bucket - self._bucket, WINDOW_BUCKETS) + 1):
                index = (self._bucket + step) % WINDOW_BUCKETS
                self.requests -= self._requests[index]
                self.successes -= self._successes[index]
                self._requests[index] = self._successes[index] = 0
            self._bucket = bucket
        return bucket % WINDOW_BUCKETS


def rejection_probability(requests: int, successes: int, config: LoadSheddingConfig) -> float:
    """Envoy's admission-control formula (aggression 1), capped; see the module docstring."""
    if requests < config.min_requests:
        return 0.0
    expected = 1.0 - config.max_failure_rate
    p = (requests - successes / expected) / (requests + 1)
    return min(max(p, 0.0), config.max_rejection_probability)


def probing(pool: Pool) -> bool:
    """A backend of the pool is half-open: its trial requests must get through."""
    return any(u.breaker.state is BreakerState.HALF_OPEN for u in pool.upstreams)


class LoadShedder:
    __slots__ = (
        "config",
        "admission",
        "router",
        "max_pending",
        "shed",
        "windows",
        "_clock",
        "_rng",
    )

    def __init__(
        self,
        config: LoadSheddingConfig,
        admission: Admission,
        router: Router,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.admission = admission
        self.router = router
        self.max_pending = config.max_pending or (admission.max_in_flight + admission.queue_size)
        self.shed = 0
        self.windows: dict[str, PoolWindow] = {}  # pool name -> its recent outcomes
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()

    def reconfigure(self, config: LoadSheddingConfig, router: Router) -> None:
        """A reload's settings and router; the windows carry over unless their length
        changed."""
        if config.failure_window != self.config.failure_window:
            self.windows.clear()
        self.config = config
        self.router = router
        admission = self.admission
        self.max_pending = config.max_pending or (admission.max_in_flight + admission.queue_size)

    def record(self, pool: str, verdict: Verdict) -> None:
        """A finished request that reached a backend, by the pool it asked for."""
        if verdict in ADMISSION_SUCCESSES:
            ok = True
        elif verdict in ADMISSION_FAILURES:
            ok = False
        else:
            return
        now = self._clock()
        window = self.windows.get(pool)
        if window is None:
            window = self.windows[pool] = PoolWindow(self.config.failure_window, now)
        window.add(ok, now)

    def pool_rejection(self, pool: str) -> float:
        """The probability with which new requests for `pool` are refused now."""
        window = self.windows.get(pool)
        if window is None:
            return 0.0
        now = self._clock()
        requests, successes = window.totals(now)
        p = rejection_probability(requests, successes, self.config)
        if p:
            recent, recent_successes = window.latest(now, RECOVERY_SAMPLE)
            failed = recent - recent_successes
            if recent >= RECOVERY_SAMPLE and failed <= self.config.max_failure_rate * recent:
                return 0.0  # the fault has ended: what fails now is within the allowance
        return p

    def gateway_reason(self) -> str | None:
        """Why every request should be refused now (the whole gateway is overloaded)."""
        if not self.config.enabled:
            return None
        admission = self.admission
        if admission.in_flight + admission.queued >= self.max_pending:
            return f"{admission.in_flight + admission.queued} requests pending"
        minimum = self.config.min_healthy_backends
        if minimum and sum(u.healthy for u in self.router.upstreams) < minimum:
            return f"fewer than {minimum} healthy backends"
        return None

    def should_shed(self) -> str | None:
        """For the reports: why requests are being refused now (the gateway's reason, else
        the first pool that sheds), or None."""
        reason = self.gateway_reason()
        if reason is not None or not self.config.enabled:
            return reason
        for name in self.windows:
            p = self.pool_rejection(name)
            if p:
                return self._pool_reason(name, p)
        return None

    def check(self, pool: Pool) -> None:
        """Refuse (raise Shed) or let a request for `pool` through. The usual case, a gateway
        below max_pending and a pool with no failure in its window, costs a few reads (expiry
        can only remove failures, so a window without one needs no advancing)."""
        config = self.config
        if not config.enabled:
            return
        admission = self.admission
        if (
            admission.in_flight + admission.queued < self.max_pending
            and not config.min_healthy_backends
        ):
            window = self.windows.get(pool.name)
            if window is None or window.requests == window.successes:
                return
        self._decide(pool)

    def _decide(self, pool: Pool) -> None:
        reason = self.gateway_reason()
        if reason is None and self.config.enabled:
            p = self.pool_rejection(pool.name)
            if p and self._rng.random() < p and not probing(pool):
                reason = self._pool_reason(pool.name, p)
        if reason is not None:
            self.shed += 1
            raise Shed(
                f"the gateway is shedding load ({reason}); retry later",
                headers={"Retry-After": str(self.admission.retry_after())},
            )

    def _pool_reason(self, pool: str, p: float) -> str:
        requests, successes = self.windows[pool].totals(self._clock())
        return (
            f"pool {pool}: failure rate {1 - successes / requests:.0%} over the last"
            f" {self.config.failure_window:g}s, refusing {p:.0%} of its requests"
        )
