"""Relay an upstream body to the client as it arrives.

Each chunk is written as soon as it is read: no buffering that would delay an SSE event. The
write awaits the client's drain, so a slow client pauses our upstream reads, and aiohttp's
StreamReader then pauses the upstream socket: memory stays flat however slow the reader.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger("request_router")


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
) -> tuple[web.StreamResponse, bool]:
    """Returns the response and whether the upstream body ended cleanly. When it did not, the
    client connection has been cut (there is no status left to send) and the caller should
    count a backend failure."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    content = upstream.content
    while True:
        try:
            chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are out, so no error status can be sent any more. Cutting the connection
            # without the final chunk is the honest signal (nginx does the same): the client
            # sees a truncated response rather than a short one that looks complete.
            log.warning("upstream failed mid-response: %r", exc)
            _cut(request)
            return response, False
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionResetError:
            # The client went away: stop the upstream generation now instead of reading on.
            upstream.close()
            return response, True
    await response.write_eof()
    return response, True


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
