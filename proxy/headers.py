"""Header rules for one hop: what goes to the backend and what comes back to the client.

Hop-by-hop headers (RFC 9110 section 7.6.1), and any header a `Connection` header names, belong
to one connection and are never forwarded, either way. Headers travel as the raw bytes the
parsers saw: forwarded values are never decoded and re-encoded on the way to the backend.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself (or computed from the body) on the way out. `Expect` is answered
# by the gateway's own server when it reads the body; the backend gets the body at once.
_REQUEST_DROP: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
MAX_KNOWN_PEERS: Final = 4096
# aiohttp's server decodes request bodies in these codings (its parser's list): the backend gets
# the decoded bytes, so the coding is not forwarded with them (issue 11, item 3).
DECODED_BY_SERVER: Final = frozenset({b"gzip", b"deflate", b"br", b"zstd"})
# Content-Length is recomputed for the body we send; the rest are the gateway's own.
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length", b"x-router-backend", b"x-request-id"}


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(token.strip().lower() for token in value.split(b","))


class TrustedProxies:
    """Peers whose X-Forwarded-For is kept and extended (Caddy's `trusted_proxies`). From any
    other peer the header is replaced by the peer's address: a client cannot choose the
    address the backend sees."""

    __slots__ = ("_networks", "_known")

    def __init__(self, entries: tuple[str, ...] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)
        self._known: dict[str, bool] = {}  # peer -> trusted, so a peer is parsed once

    def __contains__(self, peer: object) -> bool:
        if not self._networks or not isinstance(peer, str):
            return False
        trusted = self._known.get(peer)
        if trusted is None:
            try:
                address = ipaddress.ip_address(peer.split("%", 1)[0])
            except ValueError:
                return False
            trusted = any(address in network for network in self._networks)
            if len(self._known) >= MAX_KNOWN_PEERS:
                self._known.clear()
            self._known[peer] = trusted
        return trusted


def upstream_request_headers(
    request: web.Request, request_id: str, trusted: TrustedProxies
) -> bytes:
    """The header lines sent to the backend (each ending in CRLF; no Host, no length).
    Headers whose names hold an underscore are dropped, as Envoy's edge defaults do: proxies
    and frameworks disagree on whether `X_Api_Key` is `X-Api-Key`."""
    connection = request.headers.getall("Connection", ())
    named = (
        _connection_tokens(",".join(connection).encode("utf-8", "surrogateescape"))
        if connection
        else frozenset()
    )
    previous_for: bytes | None = None
    host: bytes | None = None
    lines: list[bytes] = []
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered.find(b"_") >= 0:  # find, not `in`: see proxy.streaming
            continue
        if lowered in _REQUEST_DROP:
            if lowered == b"x-forwarded-for":
                previous_for = value if previous_for is None else previous_for + b", " + value
            elif lowered == b"host" and host is None:
                host = value
        elif lowered not in named and not (
            lowered == b"content-encoding" and value.strip().lower() in DECODED_BY_SERVER
        ):
            lines += (name, b": ", value, b"\r\n")
    remote = request.remote
    peer = (remote or "unknown").encode()
    if previous_for and remote in trusted:
        forwarded_for = previous_for + b", " + peer
    else:
        forwarded_for = peer
    if host is None:
        host = request.host.encode("idna")
    lines += (
        b"X-Forwarded-For: ",
        forwarded_for,
        b"\r\nX-Forwarded-Proto: ",
        request.scheme.encode(),
        b"\r\nX-Forwarded-Host: ",
        host,
        b"\r\nX-Request-ID: ",
        request_id.encode("utf-8", "surrogateescape"),
        b"\r\n",
    )
    return b"".join(lines)


# Headers aiohttp adds to an answer that lacks them (web_response's _prepare_headers): the
# gateway adds them too to the answers it serialises itself.
HAS_CONTENT_TYPE, HAS_DATE, HAS_SERVER = 1, 2, 4
_DEFAULTED: Final = {b"content-type": HAS_CONTENT_TYPE, b"date": HAS_DATE, b"server": HAS_SERVER}
# What the gateway sets on every answer it serialises (proxy.attempt.our_lines): a backend's
# own (another gateway's) is replaced, as setting them on the multidict replaces it.
_SET_BY_US: Final = frozenset({b"x-router-attempts", b"x-router-overhead-ms"})
_SET_BY_US_FALLBACK: Final = _SET_BY_US | {b"x-router-fallback"}


def _crossing_the_hop(
    raw: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes, bytes]], frozenset[bytes]]:
    """The backend's response headers that cross the hop, as (lower-cased name, name, value),
    and the names its Connection header lists, which do not cross either (RFC 9110 7.6.1):
    the one filter of client_response_lines and client_response_headers."""
    kept: list[tuple[bytes, bytes, bytes]] = []
    listed: frozenset[bytes] = frozenset()
    for name, value in raw:
        lowered = name.lower()
        if lowered in _RESPONSE_DROP:
            if lowered == b"connection":
                listed = listed | _connection_tokens(value)
            continue
        kept.append((lowered, name, value))
    return kept, listed


def client_response_lines(
    raw: list[tuple[bytes, bytes]], backend: str, request_id: str, fallback: bool = False
) -> tuple[bytes, int]:
    """What `client_response_headers` gives, as header lines (each ending in CRLF) for an
    answer the gateway serialises itself: the backend's bytes as they came, less what does
    not cross the hop and what the gateway sets (x-router-fallback too when `fallback`);
    and which of Content-Type, Date and Server the backend gave (HAS_*)."""
    kept, listed = _crossing_the_hop(raw)
    named = _SET_BY_US_FALLBACK if fallback else _SET_BY_US
    if listed:
        named = named | listed
    given = 0
    lines: list[bytes] = []
    for lowered, name, value in kept:
        if lowered not in named:
            given |= _DEFAULTED.get(lowered, 0)
            lines += (name, b": ", value, b"\r\n")
    lines += (
        b"x-router-backend: ",
        backend.encode("utf-8", "surrogateescape"),
        b"\r\nx-request-id: ",
        request_id.encode("utf-8", "surrogateescape"),
        b"\r\n",
    )
    return b"".join(lines), given


_SERVER_LINE: Final = b"Server: %s\r\n" % SERVER_SOFTWARE.encode()


def serialised_head(
    request: web.BaseRequest,
    status: int,
    reason: str,
    lines: bytes,
    given: int,
    length: int | None,
) -> tuple[bytes, bool]:
    """The head of an answer the gateway writes itself, and whether the connection stays
    open: `lines` (client_response_lines and ours), then what aiohttp's response adds
    (web_response's _prepare_headers): Content-Length, or `Transfer-Encoding: chunked` when
    `length` is None (HTTP/1.1 only); Content-Type, Date and Server when the backend gave
    none; Connection as the request's keep-alive requires."""
    version = request.version
    keep_alive = request.keep_alive
    parts = [
        b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, status, reason.encode("latin-1")),
        lines,
        b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length,
    ]
    if not given & HAS_CONTENT_TYPE:
        parts.append(b"Content-Type: application/octet-stream\r\n")
    if not given & HAS_DATE:
        parts.append(b"Date: %s\r\n" % rfc822_formatted_time().encode())
    if not given & HAS_SERVER:
        parts.append(_SERVER_LINE)
    if keep_alive:
        if version == HttpVersion10:
            parts.append(b"Connection: keep-alive\r\n")
    elif version == HttpVersion11:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), keep_alive


def client_response_headers(
    raw: list[tuple[bytes, bytes]], backend: str, request_id: str
) -> CIMultiDict[str]:
    """The backend's response headers as the client gets them."""
    headers: CIMultiDict[str] = CIMultiDict()
    kept, listed = _crossing_the_hop(raw)
    for lowered, name, value in kept:
        if lowered not in listed:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "replace"))
    headers["x-router-backend"] = backend
    headers["x-request-id"] = request_id
    return headers
