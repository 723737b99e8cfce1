#!/usr/bin/env python3
"""The reference the gateway is measured against: a bare aiohttp + uvloop + orjson
pass-through with no gateway logic (no queue, breakers, metrics or accounting), round robin
over its upstreams, streams relayed as they arrive.

    python scripts/passthrough.py PORT UPSTREAM_URL [UPSTREAM_URL ...]
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def main() -> None:
    port = int(sys.argv[1])
    upstreams = itertools.cycle([url.rstrip("/") for url in sys.argv[2:]])

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stream = orjson.loads(body).get("stream")  # the one parse a router needs
        async with request.app[SESSION].post(
            next(upstreams) + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            if not stream:
                payload = await response.read()
                return web.Response(
                    status=response.status, body=payload, content_type="application/json"
                )
            relay = web.StreamResponse(
                status=response.status, headers={"Content-Type": "text/event-stream"}
            )
            await relay.prepare(request)
            async for data in response.content.iter_any():
                await relay.write(data)
            await relay.write_eof()
            return relay

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
