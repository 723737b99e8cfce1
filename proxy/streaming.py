"""Relay an upstream body to the client as it arrives.

Each chunk is written as soon as it is read: no buffering that would delay an SSE event. The
body is piped: each part the backend sends is written to the client from the upstream
connection's read callback (`UpstreamResponse.pipe`), in HTTP/1.1 chunked framing, so a paced
token costs no task wake-up, future or coroutine resumption (issue 14: a third of a paced
chunk's instructions). An answer the gateway frames itself (ChunkedStream) is piped from its
headers on, the head going out with the first chunk and the last-chunk marker with the last
part when they arrive together; through aiohttp's writer (CORS on), the first chunk goes
with the headers and the rest is piped. A client whose socket buffer passes its high-water
mark pauses the upstream socket until aiohttp's writer has drained, so memory stays flat
however slow the reader.
"""

from __future__ import annotations

import logging
import time
from typing import Final, Protocol

import aiohttp.web_response
import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from mypy_extensions import mypyc_attr

from proxy.headers import serialised_head
from proxy.transport import UpstreamError, UpstreamResponse
from proxy.verdict import BACKEND_FAILED, CLIENT_GONE, OK, Verdict
from telemetry.histogram import HistogramSeries
from telemetry.outcome import Outcome

log = logging.getLogger("request_router")

# Compiled (native.py), a Final name is a C static: no module attribute looked up per chunk.
perf_counter: Final = time.perf_counter
LAST_CHUNK: Final = b"0\r\n\r\n"
# A chunk's size line by its size, for the sizes of SSE events (a token's is a few hundred
# bytes): joining three parts costs half of formatting them (`b"%x\r\n%b\r\n" % ...`), and
# a paced token is one chunk (issue 14). About 200 KB.
SIZE_LINES: Final = tuple(b"%x\r\n" % size for size in range(1 << 12))


def size_line(size: int) -> bytes:
    """A chunk's size line."""
    return SIZE_LINES[size] if size < len(SIZE_LINES) else b"%x\r\n" % size


# `data.find(b"x") >= 0` rather than `b"x" in data` on the request path: CPython 3.11's bytes
# `in` first tries its operand as an integer, and builds and drops a TypeError before it
# searches: about 2,200 instructions a test, 5% of a relayed chunk (callgrind).


class StreamContext(Protocol):
    """What the relay records about the stream it carries."""

    started: float
    usage_chunk: bytes | None
    gaps: HistogramSeries | None  # the pool's inter-token gap histogram, when metrics are on

    @property
    def outcome(self) -> Outcome: ...


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class ChunkedStream(aiohttp.web_response.StreamResponse):
    """A relayed answer in HTTP/1.1 chunked coding, written by the gateway: its head (the
    backend's header lines and ours, `lines`, and what aiohttp's response would add:
    proxy.headers.serialised_head) goes out with the first chunk, then each chunk framed,
    then the last-chunk marker. aiohttp's StreamResponse would decode every header, copy it
    through two multidicts and encode it again, once per stream. Only for HTTP/1.1 requests
    whose answer has a body (deliver decides); the writer's drain is the backpressure."""

    def __init__(self, status: int, reason: str, lines: bytes, given: int) -> None:
        super().__init__(status=status, reason=reason)
        self._lines = lines
        self._given = given
        self._head: bytes | None = None  # not sent yet
        self._request: web.BaseRequest | None = None
        self._done = False
        self._keeps_alive = False

    @property
    def keep_alive(self) -> bool:
        return self._keeps_alive

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._request is None:
            self._request = request
            self._head, self._keeps_alive = serialised_head(
                request, self.status, self.reason, self._lines, self._given, None
            )
        return request.writer

    def unsent_head(self) -> bytes | None:
        """The head, for a pipe to write with the first chunk (None once it has gone out)."""
        head, self._head = self._head, None
        return head

    def keep_unsent(self, head: bytes) -> None:
        """A head a pipe took and did not write: it goes with what is written next."""
        self._head = head

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            await self._send(b"".join((size_line(len(data)), data, b"\r\n")))

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._done:
            self._done = True
            await self._send(LAST_CHUNK)

    def ended_by_pipe(self) -> None:
        """A pipe wrote the last chunk with the body's last part: write_eof has nothing left."""
        self._done = True

    async def _send(self, data: bytes) -> None:
        request = self._request
        assert request is not None, "prepare() first"
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        writer = request.writer
        writer.output_size += len(data)
        transport.write(data)
        if request.protocol.writing_paused:
            await writer.drain()


class ChunkWriter:
    """The pipe's far end: writes each part to the client as one HTTP/1.1 chunk (the first
    with `stream`'s head, when there is one; the last with the last-chunk marker, when the
    body ended in the read that brought it) and notes the gap since the last in the pool's
    gap histogram. Returns True (hold the backend) when the client's socket buffer is
    past its high-water mark or the client has gone. What it writes is added to aiohttp's
    writer's count, which the access log reports as bytes_sent.

    Called once per relayed token, so it does little (issue 14): the buffer's fill is asked
    of the transport rather than through aiohttp's writing_paused property; the bytes are
    added to aiohttp's count at the first write (from then on the answer has begun, which
    error handling asks) and at the end (`settle`), not per chunk; and the last two parts
    are kept for `usage` to be looked for once, at the end (OpenAI-style streams send it in
    the last event before `[DONE]`), not in every part."""

    __slots__ = (
        "transport",
        "writer",
        "stream",
        "context",
        "gaps",
        "high_water",
        "head",
        "last",
        "latest",
        "previous",
        "gone",
        "uncounted",
    )

    def __init__(
        self,
        request: web.Request,
        context: StreamContext,
        last: float,
        stream: ChunkedStream | None,
    ) -> None:
        transport = request.transport
        self.transport = transport
        self.writer = request.writer
        self.stream = stream
        self.context = context
        self.gaps = context.gaps
        self.high_water = transport.get_write_buffer_limits()[1] if transport is not None else 0
        self.head = stream.unsent_head() if stream is not None else None
        self.last = last
        self.latest: bytes | None = None
        self.previous: bytes | None = None
        self.gone = False
        self.uncounted = 0  # bytes written and not yet in the writer's output_size

    def write(self, chunk: bytes, last: bool) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.gone = True
            return True
        self.previous, self.latest = self.latest, chunk
        parts: tuple[bytes, ...] = (size_line(len(chunk)), chunk, b"\r\n")
        head = self.head
        if head is None:
            gaps = self.gaps
            if gaps is not None:
                now = perf_counter()
                gaps.observe(now - self.last)
                self.last = now
        else:  # the answer's first bytes: the first token's time is the stream's TTFT
            self.head = None
            self.last = now = perf_counter()
            context = self.context
            context.outcome.ttft = now - context.started
            parts = (head, *parts)
        stream = self.stream
        if last and stream is not None:  # the end came with it: one write, not two
            stream.ended_by_pipe()
            parts = (*parts, LAST_CHUNK)
        framed = b"".join(parts)
        if head is None:
            self.uncounted += len(framed)
        else:
            self.writer.output_size += len(framed)  # the first bytes: the answer has begun
        transport.write(framed)
        return transport.get_write_buffer_size() > self.high_water

    def settle(self) -> None:
        """Add what was written to aiohttp's count (the access log's bytes_sent)."""
        self.writer.output_size += self.uncounted
        self.uncounted = 0

    def usage_chunk(self) -> bytes | None:
        """The later of the last two parts that names `usage`, if either does."""
        for chunk in (self.latest, self.previous):
            if chunk is not None and chunk.find(b'"usage"') >= 0:
                return chunk
        return None


async def relay(
    request: web.Request,
    upstream: UpstreamResponse,
    response: web.StreamResponse,
    backend: str,
    context: StreamContext,
) -> tuple[web.StreamResponse, Verdict]:
    """Relays the body through `response` (a ChunkedStream, or aiohttp's StreamResponse);
    returns it and how the relay ended, as a verdict: OK, BACKEND_FAILED (the backend broke
    off or stalled) or CLIENT_GONE (the client left; the upstream request is closed)."""
    writer = await response.prepare(request)
    assert writer is not None
    try:
        if isinstance(response, ChunkedStream):  # piped from the headers on: no task
            await pipe(request, upstream, writer, context, response)  # wake-up for a chunk
        elif chunk := await upstream.readany():
            now = time.perf_counter()
            context.outcome.ttft = now - context.started
            if chunk.find(b'"usage"') >= 0:
                context.usage_chunk = chunk
            await response.write(chunk)  # with the headers
            if isinstance(writer, StreamWriter) and writer.chunked:
                await pipe(request, upstream, writer, context, None, now)
            else:  # an HTTP/1.0 client, or a body that must be empty: aiohttp frames it
                await write_parts(upstream, response, context, now)
    except (TimeoutError, UpstreamError) as exc:
        stalled = isinstance(exc, TimeoutError)
        log.warning(
            "backend %s %s mid-response: %r", backend, "stalled" if stalled else "failed", exc
        )
        upstream.close()
        await _end_broken(request, response, upstream, backend, stalled)
        return response, BACKEND_FAILED
    except ConnectionResetError:
        # The client went away: stop the upstream generation now instead of reading on.
        upstream.close()
        return response, CLIENT_GONE
    await response.write_eof()
    return response, OK


async def pipe(
    request: web.Request,
    upstream: UpstreamResponse,
    writer: AbstractStreamWriter,
    context: StreamContext,
    stream: ChunkedStream | None,
    last: float = 0.0,
) -> None:
    """The body (from the headers on, with `stream`'s head; else the rest of it after the
    chunk written at `last`), piped: written from the upstream connection's read callback,
    held while the client's socket buffer is full."""
    sink = ChunkWriter(request, context, last, stream)
    upstream.pipe(sink.write)
    try:
        while await upstream.piped() and not sink.gone:
            await writer.drain()  # the client's socket buffer is full
            upstream.unhold()
    finally:
        sink.settle()
        usage_chunk = sink.usage_chunk()
        if usage_chunk is not None:
            context.usage_chunk = usage_chunk
        if sink.head is not None and stream is not None:  # no body (yet): the head waits
            stream.keep_unsent(sink.head)
    if sink.gone:
        raise ConnectionResetError("the client went away")


async def write_parts(
    upstream: UpstreamResponse, response: web.StreamResponse, context: StreamContext, last: float
) -> None:
    """The rest of the body, read and written part by part through aiohttp's writer."""
    gaps = context.gaps
    while chunk := await upstream.readany():
        if gaps is not None:
            now = time.perf_counter()
            gaps.observe(now - last)
            last = now
        if chunk.find(b'"usage"') >= 0:
            context.usage_chunk = chunk
        await response.write(chunk)


async def _end_broken(
    request: web.Request,
    response: web.StreamResponse,
    upstream: UpstreamResponse,
    backend: str,
    stalled: bool,
) -> None:
    """Headers are out, so no error status can be sent any more.

    An SSE stream gets a final error event (the shape vLLM and OpenAI use, which the openai
    SDK raises as an APIError) and then ends; never a `[DONE]` that would make a cut-off
    answer look complete. Any other body is cut without its last chunk (as nginx does), so
    the client sees a truncated response rather than a short one that looks whole.
    """
    if upstream.content_type == "text/event-stream":
        what = "stopped sending" if stalled else "broke off the stream"
        event = {
            "error": {
                "message": f"backend '{backend}' {what}; the response is incomplete",
                "type": "upstream_error",
                "code": "upstream_stalled" if stalled else "upstream_disconnected",
            }
        }
        try:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            await response.write_eof()
            return
        except ConnectionResetError:
            return
    transport = request.transport
    if transport is not None:
        transport.abort()
