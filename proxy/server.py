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

Only the error path differs: the request path never reaches this code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError

from proxy.errors import error_response

log = logging.getLogger("request_router")

RefusalCounter = Callable[[int], None]

DUPLICATE_CONTENT_TYPE_HINT = (
    " Send one Content-Type header (ApacheBench adds its own with -p: give the type with"
    " -T application/json instead of -H)."
)


class GatewayRequestHandler(web.RequestHandler):
    """One client connection. `handle_error` is aiohttp's own hook for the answers its
    protocol gives itself (unparseable requests; a handler that fails outside the error
    middleware): JSON like every other error of ours, and counted."""

    __slots__ = ("count_refusal",)

    count_refusal: RefusalCounter

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


class GatewayServer(web.Server):
    """aiohttp's low-level server, making our protocol for each connection."""

    def __init__(self, *args: Any, count_refusal: RefusalCounter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_refusal = count_refusal

    def __call__(self) -> web.RequestHandler:
        handler = GatewayRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.count_refusal = self.count_refusal
        return handler


class GatewayRunner(web.AppRunner):
    """web.AppRunner serving the app through GatewayServer. aiohttp builds the Server inside
    the Application; this takes the same handler, request factory and options over."""

    __slots__ = ("_count_refusal",)

    def __init__(
        self, app: web.Application, *, count_refusal: RefusalCounter, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._count_refusal = count_refusal

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            count_refusal=self._count_refusal,
            **server._kwargs,
        )
