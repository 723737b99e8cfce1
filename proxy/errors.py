"""Every error the gateway answers with, the mapping from transport errors to them, and the one
place (the middleware) that turns them into a status code and a JSON body.

Bodies follow OpenAI's error shape, `{"error": {"message", "type", "code"}}`, so SDK clients
surface the message as they would from OpenAI itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping

from aiohttp import web

from proxy.handler_types import Handler, Middleware
from proxy.jsonbody import json_bytes
from proxy.transport import ConnectFailed
from proxy.verdict import (
    BACKEND_FAILED,
    CLIENT_ERROR,
    GATEWAY_REFUSED,
    RETRYABLE,
    THROTTLED,
    Verdict,
)

log = logging.getLogger("request_router")


class GatewayError(Exception):
    """A request the gateway answers itself. Each class declares, in its header, the status,
    the OpenAI-style error type and code, and the verdict that retry, shedding and telemetry
    read; a subclass states only what differs from its parent."""

    status = 500
    error_type = "server_error"
    code = "internal_error"
    verdict: Verdict = BACKEND_FAILED
    closes_connection = False  # the connection cannot serve another request after this one

    def __init_subclass__(
        cls,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        super().__init_subclass__()
        if status is not None:
            cls.status = status
        if error_type is not None:
            cls.error_type = error_type
        if code is not None:
            cls.code = code
        if verdict is not None:
            cls.verdict = verdict

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers


# --- the client's doing: 4xx, nothing said about any backend ---------------------------------


class InvalidRequest(
    GatewayError,
    status=400,
    error_type="invalid_request_error",
    code="invalid_request",
    verdict=CLIENT_ERROR,
):
    """Malformed or unacceptable input."""


class Unauthorized(
    InvalidRequest, status=401, error_type="authentication_error", code="unauthorized"
):
    """An admin change without the admin token."""


class Forbidden(InvalidRequest, status=403, error_type="permission_error", code="forbidden"):
    """An admin change from a peer that may not make it."""


class ChaosDisabled(Forbidden, code="chaos_disabled"):
    """The chaos endpoints are off (chaos.enabled)."""


class ModelNotFound(InvalidRequest, status=404, code="model_not_found"):
    """A model the config does not have: never forwarded."""


class UnknownBackend(InvalidRequest, status=404, code="backend_not_found"):
    """An admin request naming a backend the config does not have."""


class PayloadTooLarge(InvalidRequest, status=413, code="payload_too_large"):
    """A body over server.max_body_bytes."""


class BudgetExhausted(
    InvalidRequest, status=402, error_type="insufficient_quota", code="budget_exhausted"
):
    """The budget is spent and budget.on_exhausted says refuse."""


class ConstraintUnsatisfiable(InvalidRequest, status=422, code="constraint_unsatisfiable"):
    """No backend meets the request's routing constraints."""


class UnsupportedCoding(
    InvalidRequest, status=501, error_type="not_implemented", code="unsupported_coding"
):
    """A request transfer coding other than chunked: the body cannot be read as sent."""


class RequestTimeout(InvalidRequest, status=408, code="request_timeout"):
    """The request body went silent for server.body_timeout: the connection is closed."""

    closes_connection = True


class RateLimited(
    GatewayError,
    status=429,
    error_type="rate_limit_error",
    code="rate_limit_exceeded",
    verdict=THROTTLED,
):
    """A rate limit of ours: come back after Retry-After."""


# --- a backend failed: 502 / 504 --------------------------------------------------------------


class BadGateway(
    GatewayError, status=502, error_type="upstream_error", code="bad_gateway", verdict=RETRYABLE
):
    """The backend failed before its answer: another backend may take the request."""


class UpstreamUnreachable(BadGateway, code="backend_unreachable"):
    """Nothing reached the backend, so another backend may safely take the request."""


class GatewayTimeout(
    GatewayError,
    status=504,
    error_type="upstream_error",
    code="upstream_timeout",
    verdict=RETRYABLE,
):
    """The backend sent no answer in time."""


class BrokenResponse(BadGateway, verdict=BACKEND_FAILED):
    """The backend's answer broke off after its headers: not retried (it may have acted)."""


class StalledResponse(GatewayTimeout, verdict=BACKEND_FAILED):
    """The backend went silent in the middle of its answer."""


# --- the gateway protects itself: 503 with Retry-After ----------------------------------------


class NoBackendAvailable(
    GatewayError,
    status=503,
    error_type="service_unavailable",
    code="no_backend_available",
    verdict=GATEWAY_REFUSED,
):
    """No backend of the pool can serve now (all down, open, cooling down or full)."""


class QueueFull(NoBackendAvailable, code="queue_full"):
    """The admission queue is full."""


class QueueTimeout(NoBackendAvailable, code="queue_timeout"):
    """No slot came free within queue.timeout."""


class Shed(NoBackendAvailable, code="load_shed"):
    """Load shedding refused the request."""


class AccountingDisabled(NoBackendAvailable, code="accounting_disabled"):
    """The cost analysis needs accounting, which is off."""


# OpenAI's answer headers that its SDKs read before retrying on their own.
SHOULD_RETRY = "x-should-retry"
RETRY_AFTER_MS = "retry-after-ms"


def add_retry_after_ms(headers: MutableMapping[str, str]) -> None:
    """Every Retry-After in delta-seconds also as `retry-after-ms` (the openai SDK prefers it)."""
    value = headers.get("Retry-After")
    if value is not None and RETRY_AFTER_MS not in headers:
        try:
            headers[RETRY_AFTER_MS] = str(round(float(value) * 1000))
        except ValueError:
            pass  # an HTTP-date: left as it is


def upstream_failure(exc: BaseException, backend: str) -> GatewayError:
    """A transport error before the backend's answer, as the error the client would get.
    All three are RETRYABLE: the backend sent nothing the client has seen."""
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"backend '{backend}' is unreachable: {exc}")
    if isinstance(exc, TimeoutError):
        return GatewayTimeout(f"backend '{backend}' sent no response in time")
    return BadGateway(f"backend '{backend}' failed: {exc}")


def broken_response(exc: BaseException, backend: str) -> GatewayError:
    """A transport error while reading a buffered answer whose headers came."""
    if isinstance(exc, TimeoutError):
        return StalledResponse(f"backend '{backend}' stalled while sending its response")
    return BrokenResponse(f"backend '{backend}' broke off its response: {exc}")


def error_body(message: str, error_type: str, code: str) -> bytes:
    """OpenAI's error shape, the one body every error of ours has."""
    return json_bytes({"error": {"message": message, "type": error_type, "code": code}})


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(message, error_type, code)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# aiohttp raises these itself (no route, wrong method, body over client_max_size).
_AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


REQUEST_ID = web.RequestKey("request_id", str)


class ErrorAnswers:
    """The one place a handler's exception becomes the client's answer: JSON with the right
    status; no traceback reaches a client. `count_refusal(status)`: called for each request
    answered with an error before it reached the forwarding loop (which records its own
    outcomes). Used by the middleware and by the data plane's dispatch (proxy.server), which
    serves the proxied API without aiohttp's router and middleware chain."""

    __slots__ = ("max_body_bytes", "count_refusal")

    def __init__(self, max_body_bytes: int, count_refusal: Callable[[int], None]) -> None:
        self.max_body_bytes = max_body_bytes
        self.count_refusal = count_refusal

    def __call__(self, request: web.Request, exc: Exception, started: float) -> web.Response:
        """Called in the handler's `except` block (the traceback is logged from there); an
        aiohttp redirect (status < 400) is raised again. `started`: when handling began."""
        if isinstance(exc, web.HTTPException):
            if exc.status < 400:
                raise exc
            message = _aiohttp_message(request, exc, self.max_body_bytes)
            code = _AIOHTTP_CODES.get(exc.status, "http_error")
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, message, "invalid_request_error", code, allow)
        elif isinstance(exc, GatewayError):
            message = exc.message
            response = error_response(
                exc.status, exc.message, exc.error_type, exc.code, exc.headers
            )
            if exc.closes_connection:
                response.force_close()
        else:
            log.exception("unhandled error on %s %s", request.method, request.path)
            message = "internal gateway error"
            response = error_response(500, message, "server_error", "internal_error")
        request_id = request.get(REQUEST_ID)
        headers = response.headers
        if request_id is not None:
            headers["x-request-id"] = request_id
        add_retry_after_ms(headers)
        if "x-router-attempts" not in headers:
            # Refused before the forwarding loop (which says how far a request got in these
            # headers): nothing else records it, so it is counted and logged here.
            self.count_refusal(response.status)
            log.info(
                "refused before routing: %d %s %s from %s: %s",
                response.status,
                request.method,
                request.path,
                request.remote,
                message,
            )
            headers["x-router-backend"] = "none"
            headers["x-router-attempts"] = "0"
        headers.setdefault("x-router-overhead-ms", f"{(time.perf_counter() - started) * 1000:.3f}")
        return response


def error_middleware(
    answers: ErrorAnswers,
    check_access: Callable[[web.Request], None] | None = None,
) -> Middleware:
    """Every failure leaves as `answers` says. `check_access(request)`: who may use the route
    (control.access), raising its refusal; run here rather than as a middleware of its own to
    spare every request a coroutine frame."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            if check_access is not None:
                check_access(request)
            return await handler(request)
        except Exception as exc:
            return answers(request, exc, started)

    return middleware


def _aiohttp_message(request: web.Request, exc: web.HTTPException, max_body_bytes: int) -> str:
    if exc.status == 413:
        return f"request body is larger than the limit of {max_body_bytes} bytes"
    if exc.status == 404:
        return f"no route for {request.method} {request.path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    return exc.reason
