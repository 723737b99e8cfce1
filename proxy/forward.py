"""Header rules for one hop: what goes to the backend and what comes back to the client.

Hop-by-hop headers (RFC 9110 section 7.6.1), and any header a `Connection` header names, belong
to one connection and are never forwarded, either way.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway itself (or by aiohttp from the body) on the way out.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
}
# Content-Length is recomputed for the body we send; the rest are the gateway's own.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-router-backend", "x-request-id"}


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def upstream_request_headers(request: web.Request, request_id: str) -> CIMultiDict[str]:
    incoming = request.headers
    named = _connection_tokens(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in incoming.items():
        lowered = key.lower()
        if lowered not in _REQUEST_DROP and lowered not in named:
            headers.add(key, value)
    peer = request.remote or "unknown"
    previous = incoming.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers["X-Request-ID"] = request_id
    return headers


def client_response_headers(
    upstream_headers: CIMultiDictProxy[str], backend: str, request_id: str
) -> CIMultiDict[str]:
    named = _connection_tokens(upstream_headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream_headers.items():
        lowered = key.lower()
        if lowered not in _RESPONSE_DROP and lowered not in named:
            headers.add(key, value)
    headers["x-router-backend"] = backend
    headers["x-request-id"] = request_id
    return headers
