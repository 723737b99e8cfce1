"""One exchange with one backend, on a slot the caller holds (proxy.forward takes and releases
it): `send` gets the answer's headers and classifies what happened, `deliver` relays the answer
to the client. Each records what it learnt on the upstream (`Upstream.record`), once.
"""

from __future__ import annotations

import time
from typing import Final

import aiohttp.web_response
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from mypy_extensions import mypyc_attr

from proxy.errors import SHOULD_RETRY, add_retry_after_ms, broken_response, upstream_failure
from proxy.headers import client_response_headers, client_response_lines, serialised_head
from proxy.retry import DEFAULT_COOLDOWN, retry_after_seconds
from proxy.rewrite import ModelTemplate
from proxy.runtime import Runtime
from proxy.state import RequestState
from proxy.streaming import ChunkedStream, relay
from proxy.transport import (
    JOIN_LIMIT,
    NO_BODY_METHODS,
    ConnectFailed,
    StaleConnection,
    UpstreamError,
    UpstreamResponse,
)
from proxy.upstream import Upstream
from proxy.verdict import (
    BACKEND_FAILED,
    BACKEND_FAULTS,
    CLIENT_GONE,
    OK,
    SUCCESSES,
    THROTTLED,
    Verdict,
    of_status,
)
from telemetry.outcome import account_usage, usage_from_body

# Bodies up to this size that arrive with a Content-Length are read whole and sent with one
# write; anything else (SSE, chunked, large) is relayed chunk by chunk.
BUFFER_LIMIT: Final = 1 << 20


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class ForwardedResponse(aiohttp.web_response.Response):
    """A buffered backend answer. aiohttp keeps a connection's last response alive until the
    next request on it: this one lets go of its body once sent, so an idle client does not
    hold up to BUFFER_LIMIT bytes."""

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self.body = None


def without_headers(lines: bytes, names: frozenset[bytes]) -> bytes:
    """The header lines but those named (an endpoint's own headers replace the client's)."""
    kept = [
        line
        for line in lines.split(b"\r\n")
        if line and line.partition(b":")[0].strip().lower() not in names
    ]
    return b"".join(line + b"\r\n" for line in kept)


BODILESS_STATUSES: Final = frozenset({204, 304})


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class SerialisedResponse(aiohttp.web_response.StreamResponse):
    """A buffered 2xx or 3xx backend answer that has a body, written by the gateway in one
    write: status line, the backend's header lines as they came (less hop-by-hop ones:
    proxy.headers), ours, and the body. aiohttp's Response would decode every header, copy
    them through two multidicts and encode them again (49,000 instructions of a request's
    440,000; callgrind, issue 14). It adds what aiohttp's would (proxy.headers.
    serialised_head), and lets go of the body once sent, as ForwardedResponse does."""

    def __init__(self, status: int, reason: str, lines: bytes, given: int, body: bytes) -> None:
        super().__init__(status=status, reason=reason)
        self._lines = lines
        self._given = given
        self._payload: bytes | None = body
        self._writer: AbstractStreamWriter | None = None
        self._keeps_alive = False

    @property
    def keep_alive(self) -> bool:
        return self._keeps_alive

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        body = self._payload
        if body is None:
            return self._writer
        head, keep_alive = serialised_head(
            request, self.status, self.reason, self._lines, self._given, len(body)
        )
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        writer = self._writer = request.writer
        writer.output_size += len(head) + len(body)
        if len(body) < JOIN_LIMIT:
            transport.write(head + body)
        else:  # not copied
            transport.write(head)
            transport.write(body)
        self._payload = None
        self._keeps_alive = keep_alive
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._writer is not None:
            await self._writer.drain()  # a slow client holds the next request, as aiohttp does


def body_for(upstream: Upstream, state: RequestState) -> bytes:
    """The body as this backend must get it: byte for byte, unless the backend serves another
    model than the body names ("auto", a fallback, or an endpoint's served_model_name), whose
    name is spliced in."""
    template = state.template
    served = upstream.served_model
    if template is None:
        if state.fallback is None and served is None:
            return state.body
        # kept for requests that have a fallback chain or a renaming backend
        assert state.document is not None
        template = state.template = ModelTemplate(state.document)
    return template.with_model(served if served is not None else upstream.model)


async def send(
    runtime: Runtime,
    request: web.Request,
    upstream: Upstream,
    state: RequestState,
    headers: bytes,
) -> UpstreamResponse | None:
    """Send the request and wait for the answer's headers. The verdict goes to
    `state.verdict` and to the upstream; None when no answer came (`state.error` says why)."""
    method = request.method
    start = upstream.request_start(method, state.path)
    if upstream.replaced_headers:
        headers = without_headers(headers, upstream.replaced_headers)
    data = body_for(upstream, state)
    body = None if not data and method in NO_BODY_METHODS else data
    timeouts = runtime.stream_timeouts if state.stream else runtime.request_timeouts
    client = runtime.client
    origin = upstream.origin
    assert client is not None and origin is not None
    started = time.perf_counter()
    try:
        try:
            response = await client.request(origin, start, headers, body, timeouts)
        except StaleConnection:
            # A pooled keep-alive connection the backend had already closed: resend once, at
            # once, on a new connection (even a POST: the backend closed before answering).
            # A second disconnect is a real failure.
            runtime.stats.stale_retries += 1
            response = await client.request(origin, start, headers, body, timeouts, fresh=True)
    except (ConnectFailed, TimeoutError, UpstreamError) as exc:
        state.backend_time += time.perf_counter() - started
        error = upstream_failure(exc, upstream.name)
        state.error = error
        state.verdict = error.verdict
        upstream.record(error.verdict)
        return None
    waited = time.perf_counter() - started
    state.backend_time += waited
    verdict = of_status(response.status)
    if verdict is THROTTLED:
        upstream.cool_down(retry_after_seconds(response.header(b"retry-after")) or DEFAULT_COOLDOWN)
    # A success so far is recorded when its body has ended (deliver); a failure is final now.
    upstream.record(None if verdict in SUCCESSES else verdict, waited)
    state.verdict = verdict
    return response


async def deliver(
    runtime: Runtime,
    request: web.Request,
    upstream: Upstream,
    response: UpstreamResponse,
    state: RequestState,
) -> web.StreamResponse:
    """Relay the answer: read whole and sent in one write when small and of known length,
    else streamed chunk by chunk. A body that breaks off is the backend's failure."""
    outcome = state.outcome
    outcome.status = response.status
    outcome.verdict = state.verdict
    verdict = state.verdict
    pending = verdict in SUCCESSES  # its outcome is recorded once, when the body has ended
    try:
        length = response.content_length
        if length is not None and length <= BUFFER_LIMIT:
            reading = time.perf_counter()
            try:
                payload = await response.read()
            except (TimeoutError, UpstreamError) as exc:
                outcome.verdict = BACKEND_FAILED
                pending = False
                upstream.record(BACKEND_FAILED)
                raise broken_response(exc, upstream.name) from None
            if pending:
                pending = False
                upstream.record(verdict)
            state.backend_time += time.perf_counter() - reading
            if payload.find(b'"usage"') >= 0:  # find, not `in`: see proxy.streaming
                account_usage(outcome, usage_from_body(payload))
            status = response.status
            if payload and framed_by_us(runtime, request, state, status):
                lines, given = our_head(upstream, response, state)
                return SerialisedResponse(status, response.reason, lines, given, payload)
            headers = answer_headers(upstream, response, state)
            return ForwardedResponse(
                status=status, reason=response.reason, body=payload, headers=headers
            )
        if runtime.gap_series is not None:
            state.gaps = runtime.gap_series(outcome.pool)
        relayed, ended = await relay(
            request,
            response,
            relay_response(runtime, request, upstream, response, state),
            upstream.name,
            state,
        )
        if ended is BACKEND_FAILED:
            outcome.verdict = BACKEND_FAILED
            if pending:
                pending = False
                upstream.record(BACKEND_FAILED)
        elif ended is CLIENT_GONE:
            # The client left mid-answer: counted as a 499, while the exchange itself went
            # well as far as it went (nothing is held against the backend).
            runtime.stats.client_closed += 1
        return relayed
    finally:
        if pending:  # the body ended, or the client left (cancelled): it went well so far
            upstream.record(verdict)
        response.release()


def relay_response(
    runtime: Runtime,
    request: web.Request,
    upstream: Upstream,
    response: UpstreamResponse,
    state: RequestState,
) -> web.StreamResponse:
    """What a streamed answer is written through: the gateway's own chunked framing for a
    2xx/3xx answer to an HTTP/1.1 request that gets a body, else aiohttp's StreamResponse
    (which frames what HTTP/1.0, HEAD, 204 and 304 need)."""
    status = response.status
    if request.version == HttpVersion11 and framed_by_us(runtime, request, state, status):
        lines, given = our_head(upstream, response, state)
        return ChunkedStream(status, response.reason, lines, given)
    headers = answer_headers(upstream, response, state)
    return web.StreamResponse(status=status, reason=response.reason, headers=headers)


def framed_by_us(runtime: Runtime, request: web.Request, state: RequestState, status: int) -> bool:
    """An OK answer with a body, which the gateway writes itself (SerialisedResponse,
    ChunkedStream) unless CORS needs aiohttp's response preparation."""
    return (
        state.verdict is OK
        and runtime.own_framing
        and status not in BODILESS_STATUSES
        and request.method != "HEAD"
    )


def our_head(
    upstream: Upstream, response: UpstreamResponse, state: RequestState
) -> tuple[bytes, int]:
    """The header lines of an answer the gateway writes itself: the backend's and ours."""
    lines, given = client_response_lines(
        response.headers, upstream.name, state.request_id, state.fallback is not None
    )
    return lines + our_lines(state), given


def our_lines(state: RequestState) -> bytes:
    """x-router-attempts, -fallback, -overhead-ms and -backoff-ms as header lines (an OK
    answer)."""
    lines = b"x-router-attempts: %d\r\n" % state.attempt
    if state.fallback is not None:
        lines += b"x-router-fallback: %s\r\n" % state.fallback.encode()
    if state.backoff_time:
        lines += b"x-router-backoff-ms: %s\r\n" % backoff_ms(state).encode()
    return lines + b"x-router-overhead-ms: %s\r\n" % overhead_ms(state).encode()


def answer_headers(
    upstream: Upstream, response: UpstreamResponse, state: RequestState
) -> CIMultiDict[str]:
    """The client's answer headers: the backend's (proxy.headers) and how the request went."""
    headers = client_response_headers(response.headers, upstream.name, state.request_id)
    headers["x-router-attempts"] = str(state.attempt)
    headers["x-router-overhead-ms"] = overhead_ms(state)
    if state.backoff_time:
        headers["x-router-backoff-ms"] = backoff_ms(state)
    if state.fallback is not None:
        headers["x-router-fallback"] = state.fallback
    if state.verdict is not OK:
        tell_client_about_retries(headers, state.verdict)
    return headers


def tell_client_about_retries(headers: CIMultiDict[str], verdict: Verdict) -> None:
    """The backend's failure, passed on once the gateway's own retries are spent: the openai
    SDK would otherwise retry it twice more (`x-should-retry: false`); a Retry-After also
    gets OpenAI's `retry-after-ms`."""
    if verdict in BACKEND_FAULTS:
        headers[SHOULD_RETRY] = "false"
    add_retry_after_ms(headers)


def overhead_ms(state: RequestState) -> str:
    """The gateway's own time so far (not the backends'), for x-router-overhead-ms."""
    overhead = state.overhead()
    state.outcome.overhead = overhead
    return f"{overhead * 1000:.3f}"


def backoff_ms(state: RequestState) -> str:
    """The pauses between retries so far, for x-router-backoff-ms (not overhead)."""
    return f"{state.backoff_time * 1000:.3f}"
