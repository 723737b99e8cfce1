"""Qdrant writes copied to every replica (`qdrant.writes: all`), as Envoy's request mirroring
does, except that the copies are awaited: the client's answer is the primary's, and the
handler returns (so its connection takes the next request) only once every copy has been
answered, so a search after a write finds it on whichever replica serves it.

Qdrant's REST API writes with PUT, PATCH and DELETE, and with POST except on the paths that
read (search, query, scroll, recommend, discover, count, retrieve by ids, facets).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.errors import upstream_failure
from proxy.headers import upstream_request_headers
from proxy.runtime import Runtime
from proxy.transport import UpstreamError
from proxy.upstream import READY, Upstream
from proxy.verdict import SUCCESSES, of_status

log = logging.getLogger("request_router")

WRITE_METHODS = frozenset({"PUT", "PATCH", "DELETE"})
READING_POSTS = (
    "/search",
    "/search/batch",
    "/search/groups",
    "/search/matrix/pairs",
    "/search/matrix/offsets",
    "/query",
    "/query/batch",
    "/query/groups",
    "/scroll",
    "/recommend",
    "/recommend/batch",
    "/recommend/groups",
    "/discover",
    "/discover/batch",
    "/count",
    "/facet",
    "/points",  # POST /collections/{name}/points retrieves points by id
)


def is_qdrant_write(method: str, path: str) -> bool:
    if method in WRITE_METHODS:
        return True
    if method != "POST":
        return False
    route = path.partition("?")[0].rstrip("/")
    return route.startswith("/collections/") and not route.endswith(READING_POSTS)


async def copy_write(
    runtime: Runtime,
    request: web.Request,
    upstream: Upstream,
    path: str,
    body: bytes,
    request_id: str,
) -> bool:
    """Send the write to one more replica, holding one of its slots; True when it took it.
    A refusal or failure is logged and counted against the replica (it now differs from the
    primary), never passed to the client, whose answer is the primary's."""
    admission = runtime.admission
    if not admission.take(upstream):
        log.error(
            "qdrant write %s %s not copied to %s: no free slot", request.method, path, upstream.name
        )
        return False
    try:
        headers = upstream_request_headers(request, request_id, runtime.trusted_proxies)
        client, origin = runtime.client, upstream.origin
        assert client is not None and origin is not None
        try:
            response = await client.request(
                origin,
                upstream.request_start(request.method, path),
                headers,
                body or None,
                runtime.request_timeouts,
            )
            try:
                await response.read()
            finally:
                response.release()
        except (TimeoutError, UpstreamError) as exc:
            error = upstream_failure(exc, upstream.name)
            upstream.record(error.verdict)
            log.error(
                "qdrant write %s %s not copied to %s: %s",
                request.method,
                path,
                upstream.name,
                error.message,
            )
            return False
        verdict = of_status(response.status)
        upstream.record(verdict)
        if verdict not in SUCCESSES:
            log.error(
                "qdrant write %s %s copied to %s answered %d",
                request.method,
                path,
                upstream.name,
                response.status,
            )
        return verdict in SUCCESSES
    finally:
        admission.release(upstream)


def start_copies(
    runtime: Runtime,
    request: web.Request,
    replicas: tuple[Upstream, ...],
    path: str,
    body: bytes,
    request_id: str,
) -> list[asyncio.Task[bool]]:
    loop = asyncio.get_running_loop()
    return [
        loop.create_task(copy_write(runtime, request, replica, path, body, request_id))
        for replica in replicas
        if replica.live() and replica.admin_state == READY
    ]
