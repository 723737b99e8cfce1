"""Relay an upstream body to the client as it arrives.

Each chunk is written as soon as it is read: no buffering that would delay an SSE event. The
write awaits the client's drain, so a slow client pauses our upstream reads, and aiohttp's
StreamReader then pauses the upstream socket: memory stays flat however slow the reader.
"""

from __future__ import annotations

import logging

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger("request_router")

# How a relay ended.
COMPLETE = "complete"
UPSTREAM_FAILED = "upstream_failed"
CLIENT_GONE = "client_gone"


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    backend: str,
) -> tuple[web.StreamResponse, str]:
    """Returns the response and how the relay ended: COMPLETE, UPSTREAM_FAILED (count a
    backend failure) or CLIENT_GONE (the client left; the upstream request is closed)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    content = upstream.content
    while True:
        try:
            chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            stalled = isinstance(exc, TimeoutError)
            log.warning(
                "backend %s %s mid-response: %r", backend, "stalled" if stalled else "failed", exc
            )
            upstream.close()
            await _end_broken(request, response, upstream, backend, stalled)
            return response, UPSTREAM_FAILED
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionResetError:
            # The client went away: stop the upstream generation now instead of reading on.
            upstream.close()
            return response, CLIENT_GONE
    await response.write_eof()
    return response, COMPLETE


async def _end_broken(
    request: web.Request,
    response: web.StreamResponse,
    upstream: aiohttp.ClientResponse,
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
