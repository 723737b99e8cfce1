"""The request path: parse what routing needs -> select -> forward -> relay, with failover.

Bodies are forwarded byte for byte unless the gateway must change them (a model chosen for
`"model": "auto"`, a vector search translated for Qdrant).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from admission.constraints import (
    BudgetExhausted,
    excluded_by_constraints,
    has_constraint_headers,
    routing_request,
)
from admission.queue import NORMAL_PRIORITY, PRIORITIES, Admission
from admission.ratelimit import RateLimiter
from admission.shedding import LoadShedder, Shed
from balancers.registry import COST_AWARE
from balancers.request import RoutingRequest
from config.schema import Config
from health.stats import is_failure_status
from proxy.errors import (
    REQUEST_ID,
    BadGateway,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    NoBackendAvailable,
)
from proxy.headers import client_response_headers, upstream_request_headers
from proxy.jsonbody import json_bytes
from proxy.retry import DEFAULT_COOLDOWN, RETRY_STATUSES, RetryPolicy, retry_after_seconds
from proxy.router import Router
from proxy.streaming import CLIENT_GONE, UPSTREAM_FAILED, relay
from proxy.transport import (
    NO_BODY_METHODS,
    ConnectFailed,
    StaleConnection,
    Timeouts,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)
from proxy.upstream import Pool, Upstream
from telemetry.accounting import Accountant
from telemetry.outcome import Outcome, Telemetry

# Bodies up to this size that arrive with a Content-Length are read whole and sent with one
# write; anything else (SSE, chunked, large) is relayed chunk by chunk.
BUFFER_LIMIT = 1 << 20
QDRANT_PREFIX = "/qdrant"
MAX_REQUEST_ID_LENGTH = 200


class UpstreamUnreachable(BadGateway):
    """Nothing reached the backend, so another backend may safely take the request."""

    code = "backend_unreachable"


class AttemptFailed(Exception):
    """An attempt failed before anything was sent to the client: it may be retried."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class RequestContext:
    """One request across its attempts: what the response headers and the outcome need."""

    __slots__ = (
        "request_id",
        "started",
        "backend_time",
        "attempt",
        "fallback",
        "pools",
        "outcome",
        "usage_chunk",
        "observe_gap",
    )

    def __init__(self, request_id: str, pools: tuple[Pool, ...], outcome: Outcome) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self.backend_time = 0.0  # spent waiting on backends: excluded from gateway overhead
        self.attempt = 0
        self.fallback: str | None = None  # the model that served instead of the requested one
        self.pools = pools  # where a retry could go
        self.outcome = outcome
        self.usage_chunk: bytes | None = None  # the stream chunk that carried `usage`
        self.observe_gap: Callable[[float], None] | None = None

    def retry_possible(self) -> bool:
        return any(pool.has_live() for pool in self.pools)

    def overhead(self) -> float:
        return time.perf_counter() - self.started - self.backend_time


class GatewayStats:
    """Counters of what the request path did, for the admin and metrics endpoints."""

    __slots__ = ("retries", "failovers", "fallbacks", "stale_retries", "client_closed")

    def __init__(self) -> None:
        self.retries = 0
        self.failovers = 0
        self.fallbacks = 0
        self.stale_retries = 0
        self.client_closed = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


async def read_body(request: web.Request) -> bytes:
    """The request body, up to the body size limit. Not `request.read()`: that copies the body
    twice and keeps it on the request, which aiohttp keeps alive with its connection until
    the next request arrives (an idle client would hold its last upload)."""
    content = request.content
    limit = request.client_max_size
    if content.is_eof():  # all of it came with the headers: the usual small JSON request
        body = content.read_nowait()
        size = len(body)
    else:
        chunks = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        body = b"".join(chunks)
    if size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    return body


class ForwardedResponse(web.Response):
    """A buffered backend answer. aiohttp keeps a connection's last response alive until the
    next request on it: this one lets go of its body once sent, so an idle client does not
    hold up to BUFFER_LIMIT bytes."""

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self.body = None


def parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(document, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, got {type(document).__name__}",
            code="invalid_json",
        )
    return document


def usage_from_body(payload: bytes) -> Any:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return document.get("usage") if isinstance(document, dict) else None


def usage_from_stream(chunk: bytes) -> Any:
    """`usage` from the SSE event in `chunk` that carries it (the final chunk of a stream
    with stream_options.include_usage)."""
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: ") and b'"usage"' in line:
            usage = usage_from_body(line[6:])
            if usage is not None:
                return usage
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Gateway:
    """Route handlers over one Router and one long-lived upstream client."""

    def __init__(self, config: Config, router: Router) -> None:
        self.client: UpstreamClient | None = None
        self.admission = Admission(
            config.routing.max_concurrent_requests, config.queue.size, config.queue.timeout
        )
        self.stats = GatewayStats()
        self.telemetry = Telemetry()
        self.accountant: Accountant | None = None  # set when accounting is on
        self.spend_offset = 0.0  # spend accounted before this process started
        # pool name -> observe(seconds) for gaps between streamed chunks (Prometheus), if on
        self.gap_observer: Callable[[str], Callable[[float], None]] | None = None
        self.draining = False
        self._id_prefix = os.urandom(4).hex() + "-"
        self._ids = itertools.count(1)
        self.apply(config, router)

    def apply(self, config: Config, router: Router) -> None:
        """Take a (re)loaded config: everything derived from it is computed here, once, so
        the request path only reads attributes. In-flight requests keep what they hold."""
        self.config = config
        self.router = router
        self._bind_origins()
        self.admission.max_in_flight = config.routing.max_concurrent_requests
        self.admission.queue_size = config.queue.size
        self.admission.queue_timeout = config.queue.timeout
        previous = getattr(self, "retry", None)
        self.retry = RetryPolicy(config.retry)
        if previous is not None:  # a reload keeps the budget's history
            self.retry.budget = previous.budget
            self.retry.budget.ratio = config.retry.budget_ratio
            self.retry.budget.min_per_second = config.retry.budget_min
        self.rate_limiter = RateLimiter(config)
        self.shedder = LoadShedder(config.load_shedding, self.admission, router)
        self._priority_header = config.queue.priority_header
        routing = config.routing
        # Non-streamed: the total bounds silence too. Streams have no total: silence (before
        # the headers and between chunks) is what ends them.
        self._stream_timeouts = Timeouts(
            connect=routing.connect_timeout,
            first_byte=routing.first_byte_timeout,
            idle=routing.idle_timeout,
        )
        self._request_timeouts = Timeouts(
            connect=routing.connect_timeout,
            first_byte=routing.first_byte_timeout,
            total=routing.request_timeout,
        )
        created = int(time.time())
        self.models_body = json_bytes(
            {
                "object": "list",
                "data": [
                    {
                        "id": model.name,
                        "object": "model",
                        "created": created,
                        "owned_by": "request-router",
                        "capabilities": list(model.capabilities),
                        "specializations": list(model.specializations),
                    }
                    for model in config.models
                ],
            }
        )
        self._model_names = ", ".join(m.name for m in config.models)
        self._models = {m.name: m for m in config.models}

    async def start(self) -> None:
        pool = self.config.connection_pool
        self.client = UpstreamClient(
            limit=pool.limit,
            limit_per_host=pool.limit_per_host,
            keepalive_timeout=pool.keepalive_timeout,
            ca_file=pool.ca_file,
        )
        self._bind_origins()

    def _bind_origins(self) -> None:
        """Each backend's connection pool, looked up once (at start and on every reload, whose
        router may bring new backends) rather than on every request."""
        if self.client is not None:
            for upstream in self.router.upstreams:
                upstream.origin = self.client.origin(upstream.url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        self.client = None

    def request_id(self, request: web.Request) -> str:
        given = request.headers.get("X-Request-ID")
        if given and len(given) <= MAX_REQUEST_ID_LENGTH:
            request_id = given
        else:
            request_id = self._id_prefix + str(next(self._ids))
        request[REQUEST_ID] = request_id
        return request_id

    # --- OpenAI-compatible routes -------------------------------------------------------------

    async def completion(self, request: web.Request, path: str) -> web.StreamResponse:
        """POST /v1/chat/completions and /v1/completions (registered with their path bound)."""
        request_id = self.request_id(request)
        body = await read_body(request)
        document = parse_object(body)
        stream = document.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest(f"'stream' must be a boolean, got {stream!r}", code="invalid_type")
        model = document.get("model")
        auto = model is None or model == "auto"
        if auto:
            pool = self.router.auto
        elif not isinstance(model, str):
            raise InvalidRequest(f"'model' must be a string, got {model!r}", code="invalid_type")
        else:
            found = self.router.models.get(model)
            if found is None:
                raise ModelNotFound(
                    f"The model '{model}' does not exist. Available models: {self._model_names}"
                    " (or 'auto')."
                )
            pool = found
        routing = None
        if pool.uses_request or "routing" in document or has_constraint_headers(request):
            routing = routing_request(request, document, bool(stream))
            if "routing" in document:  # ours, not the backend's: strip it
                del document["routing"]
                body = orjson.dumps(document)
        return await self._forward(
            request,
            pool,
            path,
            body,
            request_id,
            choose_model=document if auto else None,
            stream=bool(stream),
            fallbacks=() if auto else self.router.fallbacks.get(pool.name, ()),
            routing=routing,
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        request_id = self.request_id(request)
        body = await read_body(request)
        document = parse_object(body)
        if "input" not in document:
            raise InvalidRequest("'input' is required", code="missing_field")
        return await self._forward(
            request, self.router.embedding, "/v1/embeddings", body, request_id
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.models_body, content_type="application/json")

    # --- vector routes ------------------------------------------------------------------------

    async def vector_search(self, request: web.Request) -> web.StreamResponse:
        """`{"query_vector", "collection", "limit"}` -> Qdrant's points/search on the pool."""
        request_id = self.request_id(request)
        document = parse_object(await read_body(request))
        vector = document.get("query_vector")
        if not isinstance(vector, list) or not vector or not all(map(_is_number, vector)):
            raise InvalidRequest(
                "'query_vector' must be a non-empty list of numbers", code="invalid_vector"
            )
        collection = document.get("collection")
        if not isinstance(collection, str) or not collection:
            raise InvalidRequest("'collection' must be a non-empty string", code="missing_field")
        limit = document.get("limit", 10)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidRequest(
                f"'limit' must be a positive integer, got {limit!r}", code="invalid_type"
            )
        search: dict[str, Any] = {
            "vector": vector,
            "limit": limit,
            "with_payload": document.get("with_payload", True),
        }
        for key in ("filter", "score_threshold", "offset", "with_vector", "params"):
            if key in document:
                search[key] = document[key]
        path = f"/collections/{quote(collection, safe='')}/points/search"
        return await self._forward(
            request,
            self.router.qdrant,
            path,
            orjson.dumps(search),
            request_id,
            route="/api/v1/vectors/search",
        )

    async def qdrant_passthrough(self, request: web.Request) -> web.StreamResponse:
        """The whole Qdrant REST API under /qdrant/: any method, path and query, as sent."""
        request_id = self.request_id(request)
        path = request.raw_path[len(QDRANT_PREFIX) :] or "/"
        if not path.startswith("/"):
            path = "/" + path
        body = await read_body(request)
        return await self._forward(
            request, self.router.qdrant, path, body, request_id, route="/qdrant"
        )

    # --- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        pool: Pool,
        path: str,
        body: bytes,
        request_id: str,
        *,
        choose_model: dict[str, Any] | None = None,
        stream: bool = False,
        fallbacks: tuple[Pool, ...] = (),
        route: str | None = None,
        routing: RoutingRequest | None = None,
    ) -> web.StreamResponse:
        """Admit -> attempt -> (retry elsewhere) until a backend answers or retries run out.

        Retries happen only while nothing has been sent to the client, go to a different
        backend whenever another is eligible, and stay inside the retry budget.
        """
        headers = upstream_request_headers(request, request_id)
        pools = (pool, *fallbacks)
        self.retry.budget.requests += 1
        priority = PRIORITIES.get(
            request.headers.get(self._priority_header, "normal").lower(), NORMAL_PRIORITY
        )
        retry = self.retry
        tried: list[Upstream] = []
        outcome = Outcome(request_id, route or path, pool.name, stream)
        context = RequestContext(request_id, pools, outcome)
        failed_at: float | None = None
        try:
            self.shedder.check()
            if self.rate_limiter.active:
                self.rate_limiter.check(
                    request, pool.name if pool.name in self.router.models else None
                )
            blocked = self.blocked_for(pool, routing)
            while True:
                upstream = self._admit_now(pools, tried, routing, blocked)
                if upstream is None:
                    queued_at = time.perf_counter()
                    upstream = await self._admit_later(pools, priority, routing, blocked)
                    outcome.queue_wait += time.perf_counter() - queued_at
                context.attempt += 1
                if context.attempt > 1:
                    self.stats.retries += 1
                fallback = upstream.pool != pool.name and pool is not self.router.auto
                context.fallback = upstream.model if fallback else None
                outcome.backend = upstream.name
                outcome.model = upstream.model
                data = body
                if choose_model is not None or fallback:
                    document = choose_model if choose_model is not None else orjson.loads(body)
                    data = orjson.dumps({**document, "model": upstream.model})
                final = context.attempt >= retry.max_attempts
                try:
                    response = await self._attempt(
                        request, upstream, path, data, headers, context, final, stream
                    )
                except AttemptFailed as failed:
                    if final or not self._may_retry(context):
                        raise failed.error from None
                    if failed_at is None:
                        failed_at = time.perf_counter()
                    tried.append(upstream)
                    others = any(p.has_live(tried) for p in pools)
                    delay = retry.backoff(context.attempt, other_backend=others)
                    if delay:
                        await asyncio.sleep(delay)
                    continue
                if tried and upstream is not tried[-1]:
                    self.stats.failovers += 1
                if fallback:
                    self.stats.fallbacks += 1
                    outcome.fallback = True
                if failed_at is not None:
                    outcome.failover_time = time.perf_counter() - failed_at
                outcome.status = response.status
                return response
        except GatewayError as exc:
            outcome.status = exc.status
            outcome.shed = isinstance(exc, Shed)
            exc.headers = {
                **(exc.headers or {}),
                "x-router-backend": outcome.backend or "none",
                "x-router-attempts": str(context.attempt),
                "x-router-overhead-ms": f"{context.overhead() * 1000:.3f}",
            }
            raise
        except asyncio.CancelledError:
            self.stats.client_closed += 1  # nginx's 499: the client went away first
            outcome.status = 499
            raise
        finally:
            self._finish(context)

    def _finish(self, context: RequestContext) -> None:
        outcome = context.outcome
        if not outcome.shed:  # shedding's own refusals must not feed its failure rate
            self.shedder.record(outcome.status)
        outcome.duration = time.perf_counter() - context.started
        outcome.attempts = context.attempt
        if not outcome.overhead:
            outcome.overhead = context.overhead()
        if context.usage_chunk is not None:
            self._account_usage(outcome, usage_from_stream(context.usage_chunk))
        model = self._models.get(outcome.model) if outcome.model is not None else None
        if model is not None and outcome.status < 400:
            outcome.cost = (
                model.cost_per_request
                + (
                    outcome.prompt_tokens * model.cost_per_1k_prompt_tokens
                    + outcome.completion_tokens * model.cost_per_1k_completion_tokens
                )
                / 1000
            )
        self.telemetry.record(outcome)

    @staticmethod
    def _account_usage(outcome: Outcome, usage: Any) -> None:
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            outcome.prompt_tokens = prompt if isinstance(prompt, int) else 0
            outcome.completion_tokens = completion if isinstance(completion, int) else 0

    def _may_retry(self, context: RequestContext) -> bool:
        """Somewhere to go, and room in the retry budget (spent only when both hold)."""
        return context.retry_possible() and self.retry.budget.try_withdraw()

    def blocked_for(self, pool: Pool, routing: RoutingRequest | None) -> tuple[Upstream, ...]:
        """Backends this request may not use: those its constraints rule out (422 when that
        is all of them) and, with the budget spent, all but the cheapest model."""
        blocked: tuple[Upstream, ...] = ()
        if routing is not None:
            blocked = excluded_by_constraints(pool.upstreams, routing)
        budget = self.config.budget
        if (
            pool is self.router.auto
            and pool.strategy in COST_AWARE
            and self.telemetry.cost_total + self.spend_offset >= budget.limit
        ):
            if budget.on_exhausted == "refuse":
                raise BudgetExhausted(
                    f"the budget of {budget.limit:g} is spent; cost-aware routing is refusing"
                )
            cheapest = min(u.cost for u in pool.upstreams)
            blocked = (*blocked, *(u for u in pool.upstreams if u.cost > cheapest))
        return blocked

    def _admit_now(
        self,
        pools: tuple[Pool, ...],
        tried: list[Upstream],
        routing: RoutingRequest | None,
        blocked: tuple[Upstream, ...],
    ) -> Upstream | None:
        """A backend slot free now, preferring untried backends, then the chain's order. A
        plain function: the common case costs no coroutine."""
        admission = self.admission
        first: Collection[Upstream] = (*tried, *blocked) if blocked else tried
        for candidates in (first, blocked) if tried else (blocked,):
            for pool in pools:
                upstream = admission.try_acquire(pool, candidates, routing)
                if upstream is not None:
                    return upstream
        return None

    async def _admit_later(
        self,
        pools: tuple[Pool, ...],
        priority: int,
        routing: RoutingRequest | None,
        blocked: tuple[Upstream, ...],
    ) -> Upstream:
        """The first slot to free up in the queue; 503 at once when no backend could serve
        at all."""
        admission = self.admission
        if admission.in_flight >= admission.max_in_flight or any(
            p.has_live(blocked) for p in pools
        ):
            return await admission.wait(pools, blocked, priority, routing)
        names = ", ".join(p.name for p in pools)
        raise NoBackendAvailable(
            f"no backend of {names} can take the request"
            " (all are unhealthy, have an open circuit or asked for a pause)",
            headers={"Retry-After": "1"},
        )

    async def _attempt(
        self,
        request: web.Request,
        upstream: Upstream,
        path: str,
        data: bytes,
        headers: bytes,
        context: RequestContext,
        final: bool,
        stream: bool,
    ) -> web.StreamResponse:
        """One upstream exchange on a slot already taken; the slot is given back when the
        response's last byte is out, or on any failure or cancellation."""
        method = request.method
        start = upstream.request_start(method, path)
        body = None if not data and method in NO_BODY_METHODS else data
        timeouts = self._stream_timeouts if stream else self._request_timeouts
        client = self.client
        origin = upstream.origin
        assert client is not None and origin is not None
        started = time.perf_counter()
        try:
            try:
                try:
                    response = await client.request(origin, start, headers, body, timeouts)
                except StaleConnection:
                    # A pooled keep-alive connection the backend had already closed: resend
                    # once, at once, on a new connection (even a POST: the backend closed
                    # before answering). A second disconnect is a real failure.
                    self.stats.stale_retries += 1
                    response = await client.request(
                        origin, start, headers, body, timeouts, fresh=True
                    )
            except ConnectFailed as exc:
                context.backend_time += time.perf_counter() - started
                self._failed(upstream)
                raise AttemptFailed(
                    UpstreamUnreachable(f"backend '{upstream.name}' is unreachable: {exc}")
                ) from None
            except TimeoutError:
                context.backend_time += time.perf_counter() - started
                self._failed(upstream)
                raise AttemptFailed(
                    GatewayTimeout(f"backend '{upstream.name}' sent no response in time")
                ) from None
            except UpstreamError as exc:
                context.backend_time += time.perf_counter() - started
                self._failed(upstream)
                raise AttemptFailed(
                    BadGateway(f"backend '{upstream.name}' failed: {exc}")
                ) from None
            waited = time.perf_counter() - started
            context.backend_time += waited
            upstream.breaker.record_latency(waited)
            upstream.latency.observe(waited)
            upstream.latencies.add(waited)
            return await self._respond(request, upstream, response, context, final)
        finally:
            self.admission.release(upstream)

    async def _respond(
        self,
        request: web.Request,
        upstream: Upstream,
        response: UpstreamResponse,
        context: RequestContext,
        final: bool,
    ) -> web.StreamResponse:
        clean = True
        try:
            status = response.status
            if status in RETRY_STATUSES:
                if status == 429:
                    upstream.cool_down(
                        retry_after_seconds(response.header(b"retry-after")) or DEFAULT_COOLDOWN
                    )
                else:
                    self._failed(upstream)
                if not final and self._may_retry(context):
                    raise AttemptFailed(BadGateway(f"backend '{upstream.name}' answered {status}"))
            elif is_failure_status(status):
                self._failed(upstream)
            else:
                upstream.breaker.record_success()
                upstream.outcomes.add(True)
            headers = client_response_headers(response.headers, upstream.name, context.request_id)
            headers["x-router-attempts"] = str(context.attempt)
            if context.fallback is not None:
                headers["x-router-fallback"] = context.fallback
            length = response.content_length
            if length is not None and length <= BUFFER_LIMIT:
                reading = time.perf_counter()
                try:
                    payload = await response.read()
                except TimeoutError:
                    clean = False
                    raise GatewayTimeout(
                        f"backend '{upstream.name}' stalled while sending its response"
                    ) from None
                except UpstreamError as exc:
                    clean = False
                    raise BadGateway(
                        f"backend '{upstream.name}' broke off its response: {exc}"
                    ) from None
                context.backend_time += time.perf_counter() - reading
                if b'"usage"' in payload:
                    self._account_usage(context.outcome, usage_from_body(payload))
                overhead = context.overhead()
                context.outcome.overhead = overhead
                headers["x-router-overhead-ms"] = f"{overhead * 1000:.3f}"
                return ForwardedResponse(
                    status=status, reason=response.reason, body=payload, headers=headers
                )
            overhead = context.overhead()
            context.outcome.overhead = overhead
            headers["x-router-overhead-ms"] = f"{overhead * 1000:.3f}"
            if self.gap_observer is not None:
                context.observe_gap = self.gap_observer(context.outcome.pool)
            relayed, outcome = await relay(request, response, headers, upstream.name, context)
            if outcome is UPSTREAM_FAILED:
                clean = False
            elif outcome is CLIENT_GONE:
                self.stats.client_closed += 1
            return relayed
        finally:
            response.release()
            if not clean:
                self._failed(upstream)

    @staticmethod
    def _failed(upstream: Upstream) -> None:
        upstream.failures += 1
        upstream.outcomes.add(False)
        upstream.breaker.record_failure()
