"""Our exceptions, and the one place that turns them into a status code and a JSON body.

Bodies follow OpenAI's error shape, `{"error": {"message", "type", "code"}}`, so SDK clients
surface the message as they would from OpenAI itself.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from proxy.handler_types import Handler, Middleware
from proxy.jsonbody import json_bytes

log = logging.getLogger("request_router")


class GatewayError(Exception):
    status = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    error_type = "permission_error"
    code = "forbidden"


class ModelNotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class BadGateway(GatewayError):
    status = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class NoBackendAvailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    code = "no_backend_available"


class GatewayTimeout(GatewayError):
    status = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = json_bytes({"error": {"message": message, "type": error_type, "code": code}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# aiohttp raises these itself (no route, wrong method, body over client_max_size).
_AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


REQUEST_ID = web.RequestKey("request_id", str)


def error_middleware(max_body_bytes: int) -> Middleware:
    """Every failure leaves as JSON with the right status; no traceback reaches a client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _aiohttp_error(request, exc, max_body_bytes)
        except GatewayError as exc:
            response = error_response(
                exc.status, exc.message, exc.error_type, exc.code, exc.headers
            )
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(
                500, "internal gateway error", "server_error", "internal_error"
            )
        request_id = request.get(REQUEST_ID)
        headers = response.headers
        if request_id is not None:
            headers["x-request-id"] = request_id
        # Refused before any backend was chosen: say so in the headers every response has.
        headers.setdefault("x-router-backend", "none")
        headers.setdefault("x-router-attempts", "0")
        headers.setdefault("x-router-overhead-ms", f"{(time.perf_counter() - started) * 1000:.3f}")
        return response

    return middleware


def _aiohttp_error(
    request: web.Request, exc: web.HTTPException, max_body_bytes: int
) -> web.Response:
    message = exc.reason
    if exc.status == 413:
        message = f"request body is larger than the limit of {max_body_bytes} bytes"
    elif exc.status == 404:
        message = f"no route for {request.method} {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    code = _AIOHTTP_CODES.get(exc.status, "http_error")
    return error_response(exc.status, message, "invalid_request_error", code, headers)
