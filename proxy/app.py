"""build_app(config): routes, middlewares and the background resources they need."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from cluster.peers import Peers
from config.schema import Config
from control.admin import AdminApi
from control.reload import HealthService, Reloader
from control.routing_api import RoutingApi
from proxy.errors import error_middleware
from proxy.handler import QDRANT_PREFIX, Gateway
from proxy.router import Router
from telemetry.accesslog import AccessLog
from telemetry.accounting import Accountant, store_for
from telemetry.costs import CostAnalysis
from telemetry.prometheus import PrometheusMetrics
from telemetry.reports import Observability

# Cancel a handler when its client disconnects, so the upstream request it waits on is
# cancelled too instead of running on for nobody.
RUNNER_OPTIONS = {"access_log": None, "handler_cancellation": True}

GATEWAY_KEY = web.AppKey("gateway", Gateway)
RELOADER_KEY = web.AppKey("reloader", Reloader)
PEERS_KEY = web.AppKey("peers", Peers)


def build_app(
    config: Config, router: Router | None = None, config_path: str | None = None
) -> web.Application:
    """`config_path`: the file a reload re-reads; by default the file `config` came from."""
    router = router if router is not None else Router(config)
    gateway = Gateway(config, router)
    health = HealthService()
    reloader = Reloader(gateway, health, config_path or config.source)
    admin = AdminApi(gateway, reloader)
    limit = config.server.max_body_bytes
    middlewares = [error_middleware(limit)]
    peers = Peers.from_environment() if config.server.workers > 1 else None
    if peers is not None:
        middlewares.insert(0, peers.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=limit)
    app[GATEWAY_KEY] = gateway
    app[RELOADER_KEY] = reloader
    if peers is not None:
        app[PEERS_KEY] = peers

        async def close_peers(app: web.Application) -> None:
            await peers.close()

        app.on_cleanup.append(close_peers)

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    async def health_checks(app: web.Application) -> AsyncIterator[None]:
        async for _ in health.running(gateway):
            yield

    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(health_checks)

    app.add_routes(
        [
            # Bound with partial rather than a wrapper coroutine: one frame less per resumption.
            web.post(
                "/v1/chat/completions", partial(gateway.completion, path="/v1/chat/completions")
            ),
            web.post("/v1/completions", partial(gateway.completion, path="/v1/completions")),
            web.post("/v1/embeddings", gateway.embeddings),
            web.get("/v1/models", gateway.list_models),
            web.post("/api/v1/vectors/search", gateway.vector_search),
            web.route("*", QDRANT_PREFIX + "/{tail:.*}", gateway.qdrant_passthrough),
            *admin.routes(),
            *Observability(gateway).routes(),
            *CostAnalysis(gateway).routes(),
            *RoutingApi(gateway).routes(),
        ]
    )
    store = store_for(config.accounting)
    if store is not None:
        accountant = Accountant(store, config.accounting)
        gateway.accountant = accountant
        gateway.telemetry.sinks.append(accountant.add)

        async def accounting(app: web.Application) -> AsyncIterator[None]:
            async for _ in accountant.running():
                # The budget counts what was spent before this process started, too.
                gateway.spend_offset = await accountant.store.total_cost()
                yield

        app.cleanup_ctx.append(accounting)
    if config.logging.access_log:
        access_log = AccessLog(config.logging.access_log)
        gateway.telemetry.sinks.append(access_log.add)

        async def access_logging(app: web.Application) -> AsyncIterator[None]:
            async for _ in access_log.running():
                yield

        app.cleanup_ctx.append(access_logging)
    if config.metrics.enabled:
        metrics = PrometheusMetrics(gateway)
        gateway.telemetry.sinks.append(metrics.observe)
        gateway.gap_observer = metrics.gap_observer
        app.router.add_get("/metrics", metrics.handler)
    return app
