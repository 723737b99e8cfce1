"""CORS for the proxied API (issue 12): a page on an allowed origin may call the OpenAI routes,
vector search and /qdrant/ from a browser; the admin API never answers another site's page
(control.access refuses it with 403 origin_not_allowed).

Preflights (OPTIONS with Access-Control-Request-Method) get their own routes, registered on
the data paths only when `cors.allowed_origins` is set; answers to allowed origins get their
headers as they are prepared (aiohttp's on_response_prepare), so streams carry them too. With
no origin configured nothing is registered and the request path pays nothing.
"""

from __future__ import annotations

from aiohttp import web

from control.access import AccessControl, Kind
from proxy.errors import Forbidden
from proxy.runtime import LiveRuntime

ANY = "*"
# What a page's script may read besides the CORS-safelisted response headers.
EXPOSED = ", ".join(
    (
        "x-request-id",
        "x-router-backend",
        "x-router-attempts",
        "x-router-fallback",
        "x-router-overhead-ms",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    )
)


class OriginNotAllowed(Forbidden, code="origin_not_allowed"):
    """A preflight from an origin cors.allowed_origins does not list."""


class Cors:
    def __init__(self, live: LiveRuntime, access: AccessControl) -> None:
        self.live = live
        self.access = access

    def allowed(self, origin: str) -> str | None:
        """The Access-Control-Allow-Origin value for `origin`, or None when not allowed."""
        origins = self.live.runtime.config.cors.allowed_origins
        if origin in origins:
            return origin
        return ANY if ANY in origins else None

    async def preflight(self, request: web.Request) -> web.Response:
        """OPTIONS on a data path: which method and headers the page may use."""
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        allowed = self.allowed(origin) if origin else None
        if allowed is None or not method:
            raise OriginNotAllowed(
                f"cross-origin calls from {origin!r} are not allowed (cors.allowed_origins)"
            )
        config = self.live.runtime.config.cors
        asked = request.headers.get("Access-Control-Request-Headers", "")
        permitted = {name.lower() for name in config.allowed_headers}
        refused = [
            name.strip()
            for name in asked.split(",")
            if name.strip() and name.strip().lower() not in permitted
        ]
        if refused:
            raise OriginNotAllowed(
                f"request headers not allowed cross-origin: {', '.join(refused)}"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": allowed,
                "Access-Control-Allow-Methods": method.upper(),
                "Access-Control-Allow-Headers": ", ".join(config.allowed_headers),
                "Access-Control-Max-Age": str(config.max_age),
                "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            },
        )

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """An answer of the proxied API to an allowed origin carries the CORS headers."""
        origin = request.headers.get("Origin")
        if origin is None or self.access.kind(request) is not Kind.DATA:
            return
        allowed = self.allowed(origin)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers.add("Vary", "Origin")

    def routes(self, paths: list[str]) -> list[web.RouteDef]:
        return [web.options(path, self.preflight) for path in paths]
