"""aiohttp's server with one change: a request its parser refuses (a malformed request line,
an invalid header, a duplicate singleton header such as the two Content-Type headers
`ab -p ... -H 'Content-Type: ...'` sends) is answered in the gateway's JSON error shape,
counted and logged, instead of with aiohttp's plain-text 400 that nothing records.

Why refuse rather than accept the duplicate: aiohttp's C parser rejects duplicate singleton
request headers (RFC 9110 §5.3) with no option to turn it off (its lax mode is private and
only for responses); its pure-Python parser has a lax mode, but that also accepts obsolete
line folding and stray whitespace (request-smuggling territory for a proxy) and costs about
12 µs more per request on this machine, 15% of the gateway's whole CPU budget. And the two
values disagree (ab sends `text/plain` first, the user's type second), so any choice would be
a guess. The parser's decision stands; only its answer changes.

Only the error path differs: the request path never reaches that code. The request path
goes through `DataPlane`: the proxied API's routes looked up in one dict and served without
the Application's router and middleware chain (issue 14).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, cast

import aiohttp.web_protocol
import aiohttp.web_runner
import aiohttp.web_server
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from mypy_extensions import mypyc_attr

from proxy.errors import ErrorAnswers, error_body, error_response
from proxy.handler_types import Handler

log = logging.getLogger("request_router")

RefusalCounter = Callable[[int], None]

DUPLICATE_CONTENT_TYPE_HINT = (
    " Send one Content-Type header (ApacheBench adds its own with -p: give the type with"
    " -T application/json instead of -H)."
)


class ClientLimits(NamedTuple):
    """What a client connection may take (server.header_timeout, max_connections_per_client;
    0 turns either off)."""

    header_timeout: float = 0.0
    max_per_client: int = 0


class SlowClientGuard:
    """Slow and greedy clients (issue 11, item 4): a request head must arrive whole within
    `header_timeout` of its first byte, or of the connection for the first request (HAProxy's
    `timeout http-request`, nginx's `client_header_timeout`), else the client gets 408 and the
    connection closes; and one address holds at most `max_per_client` connections (nginx's
    `limit_conn`), beyond which a new one gets 429 and is closed. Bodies have their own idle
    deadline where they are read (proxy.routes.read_body).

    Heads are checked by a sweep every fraction of the timeout rather than a timer per
    request: the request path pays only a comparison per read."""

    __slots__ = ("limits", "count_refusal", "connections", "per_client", "_sweep")

    def __init__(self, limits: ClientLimits, count_refusal: RefusalCounter) -> None:
        self.limits = limits
        self.count_refusal = count_refusal
        self.connections: set[GatewayRequestHandler] = set()
        self.per_client: dict[str | None, int] = {}
        self._sweep: asyncio.TimerHandle | None = None

    def opened(self, handler: GatewayRequestHandler, transport: asyncio.BaseTransport) -> None:
        self.connections.add(handler)
        peer = handler.peer
        count = self.per_client.get(peer, 0) + 1
        self.per_client[peer] = count
        cap = self.limits.max_per_client
        if cap and count > cap:
            log.warning("refused a connection from %s: %d open, the cap is %d", peer, count, cap)
            self._refuse(
                handler,
                transport,
                429,
                "Too Many Requests",
                "too_many_connections",
                f"this address already holds {cap} connections",
            )
            return
        if self.limits.header_timeout and self._sweep is None:
            self._schedule()

    def closed(self, handler: GatewayRequestHandler) -> None:
        if handler in self.connections:
            self.connections.discard(handler)
            left = self.per_client.get(handler.peer, 1) - 1
            if left:
                self.per_client[handler.peer] = left
            else:
                self.per_client.pop(handler.peer, None)

    def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _schedule(self) -> None:
        interval = min(1.0, self.limits.header_timeout / 4)
        self._sweep = asyncio.get_running_loop().call_later(interval, self._check_heads)

    def _check_heads(self) -> None:
        self._sweep = None
        if not self.connections:
            return  # the next connection schedules the sweep again
        deadline = asyncio.get_running_loop().time() - self.limits.header_timeout
        for handler in [h for h in self.connections if (h.head_since or deadline) < deadline]:
            transport = handler.transport
            if transport is not None and not transport.is_closing():
                log.info("408 to %s: no complete request head in time", handler.peer)
                self._refuse(
                    handler,
                    transport,
                    408,
                    "Request Timeout",
                    "request_timeout",
                    "the request head did not arrive in time",
                )
            handler.head_since = None
        self._schedule()

    def _refuse(
        self,
        handler: GatewayRequestHandler,
        transport: asyncio.BaseTransport,
        status: int,
        reason: str,
        code: str,
        message: str,
    ) -> None:
        """Answer outside aiohttp's request cycle (no request was parsed) and close."""
        body = error_body(message, "invalid_request_error", code)
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "x-router-backend: none\r\nx-router-attempts: 0\r\n\r\n"
        ).encode()
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head + body)
        handler.force_close()
        transport.close()
        self.count_refusal(status)


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class GatewayRequestHandler(aiohttp.web_protocol.RequestHandler):
    """One client connection. `handle_error` is aiohttp's own hook for the answers its
    protocol gives itself (unparseable requests; a handler that fails outside the error
    middleware): JSON like every other error of ours, and counted."""

    __slots__ = ("count_refusal", "head_since", "peer", "guard")

    count_refusal: RefusalCounter
    guard: SlowClientGuard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer: str | None = peer[0] if isinstance(peer, tuple) else None
        self.head_since: float | None = self._loop.time()  # the first head is awaited
        self.guard.opened(self, transport)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        web.RequestHandler.data_received(self, data)  # (not super(): one object less per read)
        if self._request_count != heads:
            self.head_since = None  # a request's head is complete
        elif self.head_since is None and not self._request_in_progress:
            self.head_since = self._loop.time()  # the first bytes of the next head

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):  # the parser refused it: there is no route
            reason = exc.message or message or "malformed request"
            if isinstance(exc, BadHttpMethod):  # often TLS or a port scan on a plain port
                log.debug("refused before routing: %d %s from %s", status, reason, request.remote)
            else:
                log.warning("refused before routing: %d %s from %s", status, reason, request.remote)
            if "Duplicate 'Content-Type'" in reason:
                reason += DUPLICATE_CONTENT_TYPE_HINT
            error_type, code = "invalid_request_error", "malformed_request"
        else:
            self.log_exception("error handling request from %s", request.remote, exc_info=exc)
            reason = "request timed out" if status == 504 else "internal gateway error"
            error_type, code = "server_error", "internal_error"
        self.count_refusal(status)
        if request.writer.output_size > 0:  # part of an answer went out: only closing is left
            raise ConnectionError("an answer was partly sent; cannot send the error")
        response = error_response(
            status,
            reason,
            error_type,
            code,
            {"x-router-backend": "none", "x-router-attempts": "0"},
        )
        response.force_close()
        return response


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
LowLevelHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class DataPlane:
    """The proxied API's fixed routes, served by aiohttp's low-level server: the request's
    method and path as sent are looked up in one dict, and the handler runs inside the same
    error handling (`ErrorAnswers`), access check and `Expect: 100-continue` handling the
    Application would give it. Anything else (another method, a path with a query string or
    escapes, the Qdrant pass-through, the admin plane) goes to the Application, whose router
    and middlewares answer it as before.

    Why: the Application's dispatch (its router's resolve, the match info, the cached
    middleware chain, the current-app middleware and the error middleware, three coroutine
    frames deep) cost 24,000 instructions of a request's 489,000 (callgrind, issue 14)."""

    __slots__ = ("routes", "answers", "check_access", "fallback")

    def __init__(
        self,
        routes: Iterable[web.RouteDef],
        answers: ErrorAnswers,
        check_access: Callable[[web.Request], None],
    ) -> None:
        self.routes: dict[tuple[str, str], tuple[Handler, ExpectHandler | None]] = {
            (route.method, route.path): (route.handler, route.kwargs.get("expect_handler"))
            for route in routes
            if "{" not in route.path
        }
        self.answers = answers
        self.check_access = check_access
        self.fallback: LowLevelHandler | None = None  # the Application's, set by the runner

    def dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """The server's request handler: a plain method returning the coroutine that handles
        the request, so it adds no frame of its own."""
        found = self.routes.get((request.method, request.raw_path))
        if found is None:
            assert self.fallback is not None
            return self.fallback(request)
        return self.serve(cast(web.Request, request), *found)

    async def serve(
        self, request: web.Request, handler: Handler, expect: ExpectHandler | None
    ) -> web.StreamResponse:
        if expect is not None and request.headers.get(hdrs.EXPECT):  # as the Application does
            refusal = await expect(request)
            await request.writer.drain()
            if refusal is not None:
                return refusal
        started = time.perf_counter()
        try:
            self.check_access(request)
            return await handler(request)
        except Exception as exc:
            return self.answers(request, exc, started)


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class GatewayServer(aiohttp.web_server.Server):
    """aiohttp's low-level server, making our protocol for each connection."""

    def __init__(
        self,
        *args: Any,
        count_refusal: RefusalCounter,
        limits: ClientLimits,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.count_refusal = count_refusal
        self.guard = SlowClientGuard(limits, count_refusal)

    def __call__(self) -> web.RequestHandler:
        handler = GatewayRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.count_refusal = self.count_refusal
        handler.guard = self.guard
        return handler

    async def shutdown(self, timeout: float | None = None) -> None:
        self.guard.stop()
        await super().shutdown(timeout)


@mypyc_attr(native_class=False)  # an aiohttp class: a plain Python class (native.py)
class GatewayRunner(aiohttp.web_runner.AppRunner):
    """web.AppRunner serving the app through GatewayServer. aiohttp builds the Server inside
    the Application; this takes the same handler, request factory and options over, with
    `data_plane` (when given) answering the proxied API's routes before the Application."""

    __slots__ = ("_count_refusal", "_limits", "_data_plane")

    def __init__(
        self,
        app: web.Application,
        *,
        count_refusal: RefusalCounter,
        limits: ClientLimits | None = None,
        data_plane: DataPlane | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._count_refusal = count_refusal
        self._limits = limits if limits is not None else ClientLimits()
        self._data_plane = data_plane

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler = server.request_handler
        if self._data_plane is not None:
            self._data_plane.fallback = handler
            handler = self._data_plane.dispatch
        return GatewayServer(
            handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            count_refusal=self._count_refusal,
            limits=self._limits,
            **server._kwargs,
        )
