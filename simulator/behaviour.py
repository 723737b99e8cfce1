"""Knobs that make a simulated backend misbehave on purpose.

Tests and the demo turn them on a live server, either directly on the object or over HTTP with
`POST /_sim/behaviour`, so the gateway under test only ever talks to a real socket.
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

KNOBS = (
    "latency",
    "token_delay",
    "tokens",
    "status",
    "fail_next",
    "retry_after",
    "drop",
    "drop_after_chunks",
    "token_bytes",
    "drop_reused",
)


@dataclass
class Behaviour:
    latency: float = 0.0  # seconds before the response starts
    token_delay: float = 0.0  # seconds between streamed tokens
    tokens: int = 8  # tokens in a completion
    status: int = 200  # every response gets this status when not 200
    fail_next: int = 0  # the next N requests get 503
    retry_after: float | None = None  # Retry-After on error responses
    drop: bool = False  # close the connection without answering
    drop_after_chunks: int | None = None  # close a stream after this many chunks
    token_bytes: int = 0  # pad each token to this many bytes (bulk streams for flow tests)
    drop_reused: int = 0  # drop the next N requests that arrive on a kept-alive connection,
    # as a server does that closes an idle connection just as a request is sent on it
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_body: bytes = b""
    last_headers: dict[str, str] = field(default_factory=dict)
    connections: weakref.WeakSet[asyncio.BaseTransport] = field(default_factory=weakref.WeakSet)

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key not in KNOBS:
                raise KeyError(key)
            setattr(self, key, value)

    def reset(self) -> None:
        for f in fields(self):
            if f.name in KNOBS:
                setattr(self, f.name, f.default)

    def snapshot(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in KNOBS}
        data.update(
            requests=self.requests, in_flight=self.in_flight, max_in_flight=self.max_in_flight
        )
        return data


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def abort_connection(request: web.Request, reset: bool = True) -> None:
    """Close the socket under the request: the peer sees a dropped connection, no response;
    with `reset`, an RST as from a crashed server, else a plain FIN."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if reset and isinstance(sock, socket.socket):
            # RST rather than FIN, as a crashed server would.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        transport.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def misbehaviour_middleware(behaviour: Behaviour) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        behaviour.requests += 1
        behaviour.in_flight += 1
        behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.in_flight)
        try:
            behaviour.last_body = await request.read()
            behaviour.last_headers = dict(request.headers)
            if behaviour.latency:
                await asyncio.sleep(behaviour.latency)
            transport = request.transport
            reused = transport is not None and transport in behaviour.connections
            if transport is not None:
                behaviour.connections.add(transport)
            if behaviour.drop_reused > 0 and reused:
                behaviour.drop_reused -= 1
                abort_connection(request, reset=False)
                return web.Response()
            if behaviour.drop:
                abort_connection(request)
                return web.Response()  # never reaches the peer: the socket is gone
            status = behaviour.status
            if behaviour.fail_next > 0:
                behaviour.fail_next -= 1
                status = 503
            if status != 200:
                headers = {}
                if behaviour.retry_after is not None:
                    headers["Retry-After"] = f"{behaviour.retry_after:g}"
                return json_response(
                    {"error": {"message": f"simulated failure {status}", "type": "server_error"}},
                    status=status,
                    headers=headers,
                )
            return await handler(request)
        finally:
            behaviour.in_flight -= 1

    return middleware


def control_routes(behaviour: Behaviour) -> list[web.RouteDef]:
    async def get_behaviour(request: web.Request) -> web.Response:
        return json_response(behaviour.snapshot())

    async def set_behaviour(request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected an object")
            if changes.pop("reset", False):
                behaviour.reset()
            behaviour.update(changes)
        except (ValueError, KeyError) as exc:
            return json_response({"error": f"bad behaviour: {exc}"}, status=400)
        return json_response(behaviour.snapshot())

    return [
        web.get("/_sim/behaviour", get_behaviour),
        web.post("/_sim/behaviour", set_behaviour),
    ]
