"""build_app(config): routes, middlewares and the background resources they need."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from health.active import ActiveHealthChecker
from proxy.admin import AdminApi
from proxy.config import Config
from proxy.errors import error_middleware
from proxy.handler import QDRANT_PREFIX, Gateway
from proxy.router import Router

# Cancel a handler when its client disconnects, so the upstream request it waits on is
# cancelled too instead of running on for nobody.
RUNNER_OPTIONS = {"access_log": None, "handler_cancellation": True}

GATEWAY_KEY = web.AppKey("gateway", Gateway)
ROUTER_KEY = web.AppKey("router", Router)


def build_app(config: Config, router: Router | None = None) -> web.Application:
    router = router if router is not None else Router(config)
    gateway = Gateway(config, router)
    admin = AdminApi(router, config.server.admin_token)
    app = web.Application(
        middlewares=[error_middleware(config.server.max_body_bytes)],
        client_max_size=config.server.max_body_bytes,
    )
    app[GATEWAY_KEY] = gateway
    app[ROUTER_KEY] = router

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    app.cleanup_ctx.append(upstream_session)
    if config.health_check.enabled:
        checker = ActiveHealthChecker(
            router.home_pools(), config.health_check, on_change=router.refresh_health
        )

        async def health_checks(app: web.Application) -> AsyncIterator[None]:
            checker.start()
            yield
            await checker.stop()

        app.cleanup_ctx.append(health_checks)

    app.add_routes(
        [
            web.post("/v1/chat/completions", gateway.chat_completions),
            web.post("/v1/completions", gateway.completions),
            web.post("/v1/embeddings", gateway.embeddings),
            web.get("/v1/models", gateway.list_models),
            web.post("/api/v1/vectors/search", gateway.vector_search),
            web.route("*", QDRANT_PREFIX + "/{tail:.*}", gateway.qdrant_passthrough),
            *admin.routes(),
        ]
    )
    return app
