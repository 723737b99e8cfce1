"""The request path, top to bottom: admit -> select -> attempt -> (retry | fail over) -> relay
-> record. `forward` is the whole rule book; each step is a function named after its rule.

Retries happen only while nothing has been sent to the client, go to a different backend
whenever another is eligible, and stay inside the retry budget (proxy.retry). A backend slot is
taken and released in `forward` itself, in `finally`, whatever happens in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import NoReturn

from aiohttp import web

from admission.constraints import excluded_by_constraints
from admission.queue import NORMAL_PRIORITY, PRIORITIES
from balancers.request import RoutingRequest
from proxy.attempt import backoff_ms, deliver, send
from proxy.errors import SHOULD_RETRY, BudgetExhausted, GatewayError, NoBackendAvailable
from proxy.headers import upstream_request_headers
from proxy.runtime import Runtime
from proxy.state import RequestState
from proxy.transport import UpstreamResponse
from proxy.upstream import Pool, Upstream
from proxy.verdict import BACKEND_FAULTS, CLIENT_GONE, OK
from telemetry.outcome import account_usage, price, usage_from_stream

log = logging.getLogger("request_router")


async def forward(
    runtime: Runtime, request: web.Request, state: RequestState
) -> web.StreamResponse:
    """Admit -> select -> attempt -> (retry elsewhere) until a backend answers or retries run
    out; the answer is relayed while the slot is held, and the outcome recorded last."""
    headers = upstream_request_headers(request, state.request_id, runtime.trusted_proxies)
    state.outcome.request = request  # for the access log (peer, method, bytes), read if on
    runtime.retry.budget.requests += 1
    try:
        refuse_when_overloaded(runtime, request, state)
        blocked = backends_ruled_out(runtime, state.pool, state.routing)
        while True:
            upstream = take_free_slot(runtime, state, blocked)
            if upstream is None:
                upstream = await wait_for_slot(runtime, request, state, blocked)
            try:
                begin_attempt(runtime, state, upstream)
                response = await send(runtime, request, upstream, state, headers)
                if not try_again(runtime, state, upstream, response):
                    if response is None:
                        raise_final_error(state)
                    count_served(runtime, state, upstream)
                    return await deliver(runtime, request, upstream, response, state)
                if response is not None:
                    response.release()  # a retryable answer nobody will read
            finally:
                runtime.admission.release(upstream)
            await pause_before_retry(runtime, state, upstream)
    except GatewayError as exc:
        refused(state, exc)
        raise
    except asyncio.CancelledError:
        client_left(runtime, state)
        raise
    finally:
        record(runtime, state)


def refuse_when_overloaded(runtime: Runtime, request: web.Request, state: RequestState) -> None:
    """Load shedding, then rate limits: refused before anything is taken."""
    runtime.shedder.check(state.pool)
    limiter = runtime.rate_limiter
    if limiter.active:
        pool = state.pool
        limiter.check(request, pool.name if pool.name in runtime.router.models else None)


def backends_ruled_out(
    runtime: Runtime, pool: Pool, routing: RoutingRequest | None
) -> tuple[Upstream, ...]:
    """Backends a request for `pool` may not use: those its constraints rule out (422 when
    that is all of them) and, with the budget spent, all but the cheapest model."""
    blocked: tuple[Upstream, ...] = ()
    if routing is not None:
        blocked = excluded_by_constraints(pool.upstreams, routing)
    budget = runtime.config.budget
    if pool is runtime.router.auto and pool.cost_aware and runtime.spent() >= budget.limit:
        if budget.on_exhausted == "refuse":
            raise BudgetExhausted(
                f"the budget of {budget.limit:g} is spent; cost-aware routing is refusing"
            )
        cheapest = min(u.cost for u in pool.upstreams)
        blocked = (*blocked, *(u for u in pool.upstreams if u.cost > cheapest))
    return blocked


def take_free_slot(
    runtime: Runtime, state: RequestState, blocked: tuple[Upstream, ...]
) -> Upstream | None:
    """A backend slot free now, preferring untried backends, then the chain's order. A plain
    function: the common case costs no coroutine."""
    admission = runtime.admission
    tried = state.tried
    first: Collection[Upstream] = (*tried, *blocked) if blocked else tried
    for candidates in (first, blocked) if tried else (blocked,):
        pools = state.pools
        if len(pools) > 1:
            if not state.pool.has_live(candidates):
                # Its own model cannot serve now (every backend's circuit is open and not yet
                # due for a trial, or cooling down: none would be available): straight to the
                # chain, without a selection that finds nothing (the fallback path's cost).
                pools = pools[1:]
            elif own_model_first(runtime, state):  # merely busy, if full: queued for
                pools = pools[:1]
        for pool in pools:
            upstream = admission.try_acquire(pool, candidates, state.routing)
            if upstream is not None:
                return upstream
    return None


def own_model_first(runtime: Runtime, state: RequestState) -> bool:
    """A named model that is merely busy (a backend of it is live, just full) is queued for,
    as the specification's queue intends: its fallback chain does not take the model's
    traffic then. The chain serves when the model is failing or unavailable, or when it opts
    in to busy fallback (`when_busy: true`)."""
    return state.pool.name not in runtime.router.fallback_when_busy


async def wait_for_slot(
    runtime: Runtime, request: web.Request, state: RequestState, blocked: tuple[Upstream, ...]
) -> Upstream:
    """Queue for the first slot to free up, by priority then arrival; 503 at once when no
    backend could serve at all."""
    admission = runtime.admission
    pools = state.pools
    if admission.has_room() and not any(p.has_live(blocked) for p in pools):
        names = ", ".join(p.name for p in pools)
        raise NoBackendAvailable(
            f"no backend of {names} can take the request"
            " (all are unhealthy, have an open circuit or asked for a pause)",
            headers={"Retry-After": "1"},
        )
    priority = PRIORITIES.get(
        request.headers.get(runtime.priority_header, "normal").lower(), NORMAL_PRIORITY
    )
    queued_at = time.perf_counter()
    own_first = len(pools) > 1 and own_model_first(runtime, state)
    try:
        return await admission.wait(pools, blocked, priority, state.routing, own_first)
    finally:
        state.outcome.queue_wait += time.perf_counter() - queued_at


def begin_attempt(runtime: Runtime, state: RequestState, upstream: Upstream) -> None:
    """Count the attempt and say which backend and model it goes to."""
    state.attempt += 1
    if state.attempt > 1:
        runtime.stats.retries += 1
    pool = state.pool
    fallback = upstream.pool != pool.name and pool is not runtime.router.auto
    state.fallback = upstream.model if fallback else None
    outcome = state.outcome
    outcome.backend = upstream.name
    outcome.model = upstream.model


def try_again(
    runtime: Runtime,
    state: RequestState,
    upstream: Upstream,
    response: UpstreamResponse | None,
) -> bool:
    """The retry rule (proxy.retry) on this attempt's verdict; a backend's failure is logged
    (nginx's "upstream failed" line) whether or not another attempt follows."""
    verdict = state.verdict
    if verdict is OK:
        return False
    if verdict in BACKEND_FAULTS:
        log_backend_failure(state, upstream, response)
    return runtime.retry.should_retry(verdict, state.attempt, state.pools)


def log_backend_failure(
    state: RequestState, upstream: Upstream, response: UpstreamResponse | None
) -> None:
    error = state.error
    if response is not None:
        reason = f"answered {response.status}"
    else:
        reason = error.message if error is not None else "no answer"
    log.error(
        "backend %s failed: %s, attempt %d of request %s (%s)",
        upstream.name,
        reason,
        state.attempt,
        state.request_id,
        state.path,
    )


def raise_final_error(state: RequestState) -> NoReturn:
    """No answer came and no retry is left: the last attempt's error goes to the client."""
    assert state.error is not None
    raise state.error


async def pause_before_retry(runtime: Runtime, state: RequestState, failed: Upstream) -> None:
    """The first failover goes at once when another backend is live; later retries back off
    exponentially with jitter."""
    if state.failed_at is None:
        state.failed_at = time.perf_counter()
    state.tried.append(failed)
    others = any(p.has_live(state.tried) for p in state.pools)
    delay = runtime.retry.backoff(state.attempt, other_backend=others)
    if delay:
        paused = time.perf_counter()
        try:
            await asyncio.sleep(delay)
        finally:
            state.backoff_time += time.perf_counter() - paused


def count_served(runtime: Runtime, state: RequestState, upstream: Upstream) -> None:
    """A backend answered and its answer goes to the client: count a failover (another
    backend than the one that failed, timed to this answer's headers) and a fallback
    (another model than the one asked for)."""
    outcome = state.outcome
    failed_at = state.failed_at
    if failed_at is not None and upstream is not state.tried[-1]:
        outcome.failover_time = time.perf_counter() - failed_at  # Telemetry.record counts it
    if state.fallback is not None:
        runtime.stats.fallbacks += 1
        outcome.fallback = True


def refused(state: RequestState, exc: GatewayError) -> None:
    """The gateway answers itself: the verdict comes with the error; the headers say where the
    request got to."""
    outcome = state.outcome
    outcome.status = exc.status
    outcome.verdict = exc.verdict
    outcome.error_code = exc.code
    headers = exc.headers = {
        **(exc.headers or {}),
        "x-router-backend": outcome.backend or "none",
        "x-router-attempts": str(state.attempt),
        "x-router-overhead-ms": f"{state.overhead() * 1000:.3f}",
    }
    if state.backoff_time:
        headers["x-router-backoff-ms"] = backoff_ms(state)
    if exc.verdict in BACKEND_FAULTS:
        headers[SHOULD_RETRY] = "false"


def client_left(runtime: Runtime, state: RequestState) -> None:
    """A cancelled client is not our failure: no retry, nothing held against a backend
    (nginx's 499)."""
    runtime.stats.client_closed += 1
    state.outcome.status = 499
    state.outcome.verdict = CLIENT_GONE


def record(runtime: Runtime, state: RequestState) -> None:
    """After the last byte (or the refusal): the outcome goes to shedding and telemetry."""
    outcome = state.outcome
    if state.attempt:  # only requests that reached a backend say anything about overload
        runtime.shedder.record(state.pool.name, outcome.verdict)
    outcome.duration = time.perf_counter() - state.started
    outcome.attempts = state.attempt
    if not outcome.overhead:
        outcome.overhead = state.overhead()
    if state.usage_chunk is not None:
        account_usage(outcome, usage_from_stream(state.usage_chunk))
    ok = outcome.verdict is OK
    if ok and outcome.model is not None:
        model = runtime.models.get(outcome.model)
        if model is not None:
            outcome.cost = price(model, 1, outcome.prompt_tokens, outcome.completion_tokens)
    runtime.telemetry.record(outcome, ok)
