#!/usr/bin/env python3
"""The reference the gateway is measured against: a bare aiohttp + uvloop + orjson
pass-through with no gateway logic (no balancing, queue, breakers, metrics or accounting).

    python scripts/passthrough.py PORT UPSTREAM_URL
"""

from __future__ import annotations

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
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        orjson.loads(body)  # the one parse a router needs (the model name)
        async with request.app[SESSION].post(
            upstream + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            payload = await response.read()
            return web.Response(
                status=response.status, body=payload, content_type="application/json"
            )

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", chat)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
