"""The upstream HTTP/1.1 client of the request path: keep-alive connections on asyncio
protocols, responses parsed by llhttp (through httptools, the parser uvicorn uses).

Why not aiohttp's ClientSession here: a proxy already holds the bytes it forwards, and py-spy
showed about a third of the gateway's CPU in the client's per-request machinery (request and
payload objects, automatic headers, cookie jar, timer contexts, stream readers). This client
writes each request with one `transport.write`, keeps parsed headers as the raw byte pairs the
relay forwards, and arms one timer per exchange. aiohttp still serves the clients, health
checks and admin traffic.

Behaviour kept from the ClientSession it replaces: connect, first-byte, idle and total
timers; keep-alive pools with an idle timeout and connection limits; flow control (a slow
reader pauses the upstream socket); a reused connection that the backend had closed is
reported as `StaleConnection` so the request can be sent again on a new one.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
from collections.abc import Callable, Iterator
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

# A streamed body waiting for its reader above this many bytes pauses the upstream socket;
# the next read takes all of it and resumes the socket.
HIGH_WATER: Final = 1 << 16
# Bodies at least this large are written after the head instead of joined to it (no copy).
JOIN_LIMIT: Final = 1 << 16
# A backend's status line and headers larger than this end the exchange (aiohttp's client
# allowed 8 KiB per line); without a cap a broken backend could grow the parser's buffer.
MAX_HEAD_BYTES: Final = 1 << 16
# Where a piped body goes (UpstreamResponse.pipe): (part, the body ended with it) -> hold.
Sink = Callable[[bytes, bool], bool]
# Requests of these methods without a body are sent without Content-Length (as clients do).
NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The exchange with a backend failed."""


class ConnectFailed(UpstreamError):
    """No connection could be opened: nothing reached the backend."""


class StaleConnection(UpstreamError):
    """A pooled keep-alive connection was closed by the backend before any byte of the
    response: the backend did not process the request, so it may be sent again."""


class UpstreamBroken(UpstreamError):
    """The backend closed the connection or sent something that is not HTTP/1.1."""


class Timeouts:
    """The timers of one kind of exchange, in seconds (None: off)."""

    __slots__ = ("connect", "first_byte", "idle", "total")

    def __init__(
        self,
        *,
        connect: float | None = None,
        first_byte: float | None = None,
        idle: float | None = None,
        total: float | None = None,
    ) -> None:
        self.connect = connect
        self.first_byte = first_byte  # until the response headers
        self.idle = idle  # silence of the backend while the gateway waits for it
        self.total = total  # the whole exchange, body included


class UpstreamResponse:
    """One response: status and raw headers at once, the body as it arrives.

    The connection is lent to the response until `release()`; released complete and
    keep-alive, it goes back to its pool, otherwise it is closed.
    """

    __slots__ = (
        "status",
        "reason",
        "headers",
        "content_length",
        "chunked",
        "complete",
        "_connection",
        "_loop",
        "_body",
        "_buffered",
        "_streaming",
        "_error",
        "_waiter",
        "_sink",
        "_held",
    )

    def __init__(self, connection: UpstreamConnection) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.complete = False
        self._connection: UpstreamConnection | None = connection
        # The connection's loop: asyncio.get_running_loop() makes a getpid() system call on
        # Python 3.11 (it checks for a fork), once per wait.
        self._loop = connection.loop
        self._body: list[bytes] = []  # parts not read yet (a read takes them all)
        self._buffered = 0
        self._streaming = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None  # pipe(): where parts go
        self._held = False  # the sink asked for a pause

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower case), decoded."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @property
    def content_type(self) -> str:
        value = self.header(b"content-type") or ""
        return value.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            await self._wait()
        body = self._body
        if len(body) == 1:
            return body[0]
        return b"".join(body)

    async def readany(self) -> bytes:
        """All of the body that has arrived and not been read yet (waiting for some if none
        has); b"" at its end. Parts that arrived together leave together: one write for the
        relay instead of one per part."""
        self._streaming = True
        body = self._body
        while not body:
            if self.complete:
                return b""
            await self._wait()
        chunk = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        connection = self._connection
        if connection is not None and connection.paused:
            connection.resume()
        return chunk

    def pipe(self, sink: Sink) -> None:
        """From now on hand each part of the body to `sink` as it arrives, from the
        connection's read callback, instead of keeping it for `readany()`: a relayed part then
        costs no task wake-up, no future and no coroutine resumption (a paced SSE token is one
        part). Parts already here go first. `sink(part, last)`: `last` when the body ended in
        the read that brought the part, so that its end can go out with it. `sink` returns True
        when it cannot take more for now: the backend's socket is paused, `piped()` returns,
        and `unhold()` resumes it."""
        self._streaming = True
        self._sink = sink
        self._buffered = 0
        self._flush(self._body)
        connection = self._connection
        if connection is not None and connection.paused and not self._held:
            connection.resume()

    async def piped(self) -> bool:
        """After `pipe()`: False when the body has ended, True when the sink asked for a
        pause; raises when the body broke off."""
        while not self.complete and not self._held:
            await self._wait()
        return not self.complete

    def unhold(self) -> None:
        """The sink can take parts again: the backend's socket reads on."""
        self._held = False
        connection = self._connection
        if connection is not None and connection.paused:
            connection.resume()

    def _flush(self, parts: list[bytes]) -> None:
        """Piping: `parts` (those kept before `pipe()`, or one read's) go to the sink as one,
        and are cleared (one write to the client per read from the backend, as `readany()`
        gives)."""
        sink = self._sink
        if parts and sink is not None:
            chunk = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            if sink(chunk, self.complete) and not self._held:
                self._hold()

    def _hold(self) -> None:
        self._held = True
        connection = self._connection
        if connection is not None and not connection.paused:
            connection.pause()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        """Stop the exchange now: the connection is closed, so is the backend's work on it."""
        self._sink = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()

    def release(self) -> None:
        """Give the connection back: to its pool when the exchange ended cleanly."""
        self._sink = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish(self)

    # called by the connection
    def _feed(self, parts: list[bytes]) -> None:
        """One read's parts of the body, kept for `readany()`."""
        self._body += parts
        for part in parts:
            self._buffered += len(part)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._streaming and self._buffered > HIGH_WATER:
            connection = self._connection
            if connection is not None and not connection.paused:
                connection.pause()

    def _end(self, error: BaseException | None) -> None:
        if error is None:
            self.complete = True
        elif not self.complete and self._error is None:  # the first cause is the one to tell
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if error is None or self.complete:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend; one exchange at a time."""

    __slots__ = (
        "origin",
        "loop",
        "transport",
        "parser",
        "closed",
        "reused",
        "paused",
        "idle_since",
        "response",
        "_waiter",
        "_received",
        "_headers_done",
        "_timer",
        "_timer_due",
        "_deadline",
        "_first_byte_deadline",
        "_idle",
        "_last",
        "_informational",
        "_head",
        "_keep_alive",
        "_head_bytes",
        "_parts",
        "on_body",
    )

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        # The parser hands each part of a body straight to a list (a C call, where a Python
        # callback cost a frame per relayed token); the read callback passes them on.
        self._parts: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self._parts.append
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.paused = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._received = False
        self._headers_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf  # when `_timer` fires
        self._deadline = math.inf
        self._first_byte_deadline = math.inf
        self._idle: float | None = None
        self._last = 0.0
        self._informational = False
        self._head = False  # answering HEAD: headers only, whatever Content-Length says
        self._keep_alive = False  # the response allows reuse (read at its headers)
        self._head_bytes = 0  # received before the headers were complete

    # --- the exchange -------------------------------------------------------------------------

    def send(
        self, request: bytes, body: bytes | None, timeouts: Timeouts
    ) -> asyncio.Future[UpstreamResponse]:
        """Write the request; the future resolves with the response at its headers."""
        assert self.transport is not None
        loop = self.loop
        now = loop.time()
        self.response = UpstreamResponse(self)
        self._received = False
        self._headers_done = False
        self._informational = False
        self._head_bytes = 0
        self._parts.clear()
        self._head = request.startswith(b"HEAD ")
        waiter = self._waiter = loop.create_future()
        self._deadline = now + timeouts.total if timeouts.total is not None else math.inf
        first_byte = timeouts.first_byte
        self._first_byte_deadline = now + first_byte if first_byte is not None else math.inf
        self._idle = timeouts.idle
        self._last = now
        self._arm()
        self.transport.write(request)
        if body:
            self.transport.write(body)
        return waiter

    def _due(self) -> float:
        due = self._deadline
        if not self._headers_done and self._first_byte_deadline < due:
            due = self._first_byte_deadline
        if self._idle is not None and not self.paused:
            idle_due = self._last + self._idle
            if idle_due < due:
                due = idle_due
        return due

    def _arm(self) -> None:
        """A timer at the earliest deadline, unless the pending one fires no later: it then
        re-arms itself for what is left (`_on_timer`). The timer outlives its exchange, so
        the next requests on a keep-alive connection usually arm none: a timer made and
        cancelled per request cost 6,000 instructions (callgrind, issue 14)."""
        due = self._due()
        if due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(due, self._on_timer)
            self._timer_due = due

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        response = self.response
        if response is None or response.complete or self.closed:
            return  # the exchange it was armed for has ended
        if self._due() > self.loop.time():
            self._arm()
            return
        waiting = "response headers" if not self._headers_done else "the response body"
        self._fail(TimeoutError(f"the backend sent nothing in time (awaiting {waiting})"))

    def finish(self, response: UpstreamResponse) -> None:
        """The response's owner is done with it."""
        if response is not self.response:
            return
        self.response = None  # a pending timer finds no exchange and lapses
        if self.closed:
            return
        if not response.complete or self._head or not self._keep_alive:
            self.abort()
            return
        if self.paused:
            self.resume()
        self.origin.put_idle(self)

    def _fail(self, error: BaseException) -> None:
        """End the exchange with `error` and close the connection (it is not reusable)."""
        self._end_exchange(error)
        self.abort()

    def _end_exchange(self, error: BaseException) -> None:
        """Whoever waits on this connection (for headers or body) gets `error`."""
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self.response is not None:
            self.response._end(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_due = math.inf

    def abort(self) -> None:
        """Close now; an exchange still waiting on the connection ends with an error rather
        than waiting for a connection_lost that, for a closed connection, tells nothing."""
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            if self.transport is not None:
                self.transport.abort()
            self.origin.forget(self)
            self._end_exchange(UpstreamBroken("the gateway closed the connection"))

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self._last = self.loop.time()
            self.transport.resume_reading()
            if self._timer is None and self.response is not None and not self.response.complete:
                self._arm()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing asked: a backend talking out of turn
            self.abort()
            return
        self._received = True
        if self._idle is not None:
            self._last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            broken: UpstreamBroken | None = UpstreamBroken(
                f"backend sent an invalid HTTP response: {exc}"
            )
        else:
            broken = None
        parts = self._parts  # the body that came before any error goes on first
        if parts:
            if response._sink is not None:  # piped: the read's parts go on as one
                response._flush(parts)
            else:
                response._feed(parts)
                parts.clear()
        if broken is not None:
            self._fail(broken)
        elif not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    UpstreamBroken(f"backend's response headers exceed {MAX_HEAD_BYTES} bytes")
                )

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._cancel_timer()
        self.origin.forget(self)
        if was_closed:
            return
        if self._waiter is not None:  # no response headers yet
            if self.reused and not self._received:
                error: UpstreamError = StaleConnection(
                    "the backend closed a kept-alive connection before answering"
                )
            else:
                error = UpstreamBroken(
                    "the backend closed the connection before sending response headers"
                )
            self._fail(error)
            return
        response = self.response
        if response is not None and not response.complete:
            if response.content_length is None and not response.chunked and self._headers_done:
                response._end(None)  # a body delimited by the end of the connection
            else:
                response._end(UpstreamBroken("the backend closed the connection mid-response"))

    def pause_writing(self) -> None:  # requests are small; the body is written whole
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        response = self.response
        assert response is not None
        if response.complete:  # a second answer to one request: never reuse this connection
            raise UpstreamBroken("the backend sent more than one response")
        response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # 1xx: an interim answer; the real one follows on this connection
            self._informational = True
            response.headers = []
            return
        response.status = status
        self._keep_alive = self.parser.should_keep_alive()
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                try:
                    response.content_length = int(value)
                except ValueError:
                    pass
            elif lowered == b"transfer-encoding":
                response.chunked = value.lower().find(b"chunked") >= 0  # (not `in`: faster)
        self._headers_done = True
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head:  # the connection is closed after it: the parser expects a body
            response._end(None)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.response is not None:
            self.response._end(None)


class Origin:
    """The connections to one scheme://host:port: idle ones are reused last-in first-out, so
    the fewest stay warm and the rest age out."""

    __slots__ = (
        "client",
        "host",
        "port",
        "ssl",
        "server_hostname",
        "idle",
        "open",
    )

    def __init__(self, client: UpstreamClient, url: str) -> None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        self.client = client
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = client.ssl_context() if secure else None
        self.server_hostname = self.host if secure else None
        self.idle: list[UpstreamConnection] = []
        self.open: set[UpstreamConnection] = set()

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        if not idle:
            return None
        expired_before = self.client.loop.time() - self.client.keepalive_timeout
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > expired_before:
                return connection
            connection.abort()
        return None

    def put_idle(self, connection: UpstreamConnection) -> None:
        connection.reused = True
        connection.idle_since = self.client.loop.time()
        self.idle.append(connection)
        self.client.wake_one()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self.client.open_count -= 1
            self.client.wake_one()
        try:
            self.idle.remove(connection)
        except ValueError:
            pass

    def sweep(self, expired_before: float) -> None:
        for connection in [c for c in self.idle if c.idle_since <= expired_before]:
            connection.abort()


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """How https backends are verified: against `ca_file` when given (a private CA, as nginx's
    proxy_ssl_trusted_certificate), else the system's trust store."""
    return ssl.create_default_context(cafile=ca_file)


class UpstreamClient:
    """Pools of keep-alive connections, one per origin, under total and per-origin limits."""

    def __init__(
        self,
        *,
        limit: int = 1000,
        limit_per_host: int = 0,
        keepalive_timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit or math.inf
        self.limit_per_host = limit_per_host or math.inf
        self.keepalive_timeout = keepalive_timeout
        self.open_count = 0
        self.closed = False
        self._origins: dict[str, Origin] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        self._ca_file = ca_file
        self._sweeper = self.loop.call_later(keepalive_timeout, self._sweep)

    def origin(self, url: str) -> Origin:
        """The pool for the scheme://host:port of `url` (created on first use)."""
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        found = self._origins.get(key)
        if found is None:
            found = self._origins[key] = Origin(self, key)
        return found

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = tls_context(self._ca_file)
        return self._ssl

    async def request(
        self,
        origin: Origin,
        start: bytes,
        headers: bytes,
        body: bytes | None,
        timeouts: Timeouts,
        *,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send a request, written as one block where it is small: `start` (the request line
        and Host), `headers` (complete header lines) and `body` (None: no body, and no
        Content-Length). Returns at the response headers; cancelled, closes the connection."""
        connection = None if fresh else origin.take_idle()
        if connection is None:
            connection = await self._connect(origin, timeouts.connect)
        if body is None:
            head = b"".join((start, headers, b"\r\n"))
        elif len(body) < JOIN_LIMIT:
            head = b"".join((start, headers, b"Content-Length: %d\r\n\r\n" % len(body), body))
            body = None
        else:
            head = b"".join((start, headers, b"Content-Length: %d\r\n\r\n" % len(body)))
        waiter = connection.send(head, body, timeouts)
        try:
            return await waiter
        except BaseException:
            connection.abort()
            raise

    async def _connect(self, origin: Origin, timeout: float | None) -> UpstreamConnection:
        while self.open_count >= self.limit or len(origin.open) >= self.limit_per_host:
            if len(origin.open) < self.limit_per_host and self._close_idle_elsewhere():
                continue
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise ConnectFailed(
                    f"no connection to {origin.host}:{origin.port} came free in time"
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
            taken = origin.take_idle()
            if taken is not None:
                return taken
        self.open_count += 1
        connection = UpstreamConnection(origin, self.loop)
        origin.open.add(connection)
        try:
            async with asyncio.timeout(timeout):
                await self.loop.create_connection(
                    lambda: connection,
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.server_hostname,
                )
        except TimeoutError:
            connection.abort()
            raise ConnectFailed(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            connection.abort()
            raise ConnectFailed(
                f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            connection.abort()
            raise
        return connection

    def _close_idle_elsewhere(self) -> bool:
        """At the total limit, an idle connection to another backend makes room."""
        for origin in self._origins.values():
            if origin.idle:
                origin.idle[0].abort()
                return True
        return False

    def wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive timeout."""
        expired_before = self.loop.time() - self.keepalive_timeout
        for origin in self._origins.values():
            origin.sweep(expired_before)
        if not self.closed:
            self._sweeper = self.loop.call_later(self.keepalive_timeout / 2, self._sweep)

    def connections(self) -> Iterator[UpstreamConnection]:
        for origin in self._origins.values():
            yield from origin.open

    async def close(self) -> None:
        self.closed = True
        self._sweeper.cancel()
        for connection in list(self.connections()):
            connection.abort()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
