"""The composition root: builds the runtime, attaches the sinks and the admin plane, registers
routes and background tasks. It decides nothing about a request."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from aiohttp import HttpVersion11, web
from prometheus_client.registry import Collector

from cluster.overrides import (
    OverrideFile,
    OverrideMemory,
    OverrideRecord,
    OverrideStore,
    apply_overrides,
    current_state,
)
from cluster.peers import Peers
from cluster.redis_sync import Member, RedisSync
from cluster.report import ClusterReport, HostsReport
from cluster.shared_table import SharedTable
from cluster.worker_share import WorkerShare
from config.schema import Config
from control.access import AccessControl, Kind
from control.admin import AdminApi
from control.audit import AuditLog
from control.cors import Cors
from control.reload import HealthService, Reloader
from control.routing_api import RoutingApi
from proxy.errors import ErrorAnswers, error_middleware, error_response
from proxy.router import Router
from proxy.routes import MODEL_ROUTED_FORMS, MODEL_ROUTED_JSON, QDRANT_PREFIX, Routes
from proxy.runtime import LiveRuntime, Runtime
from proxy.server import ClientLimits, DataPlane, GatewayRunner
from telemetry.accesslog import AccessLog
from telemetry.accounting import Accountant, store_for
from telemetry.costs import CostAnalysis
from telemetry.prometheus import PrometheusMetrics
from telemetry.reports import Reports

# Cancel a handler when its client disconnects, so the upstream request it waits on is
# cancelled too instead of running on for nobody.
RUNNER_OPTIONS: dict[str, Any] = {"access_log": None, "handler_cancellation": True}

LINGERING_SECONDS = 2.0
QDRANT_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # HEAD comes with GET
RUNTIME_KEY = web.AppKey("runtime", LiveRuntime)
RELOADER_KEY = web.AppKey("reloader", Reloader)
PEERS_KEY = web.AppKey("peers", Peers)
ACCESS_KEY = web.AppKey("access", AccessControl)
SHARE_KEY = web.AppKey("share", WorkerShare)
# Collectors of the cluster's own metrics (the Redis sync's), added to /metrics' registry.
COLLECTORS_KEY: web.AppKey[list[Collector]] = web.AppKey("collectors")
DATA_PLANE_KEY = web.AppKey("data_plane", DataPlane)


def build_app(
    config: Config,
    router: Router | None = None,
    config_path: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """`config_path`: the file a reload re-reads; by default the file `config` came from.
    `clock`: the monotonic clock every window, budget, limit and breaker reads (a given
    `router` brings its own, which should be the same); `rng`: the random source of load
    shedding's draws; `environ`: the ROUTER_* variables (with the command line's) a reload
    reads the file with, by default the process's."""
    router = router if router is not None else Router(config, clock=clock)
    live = LiveRuntime(Runtime(config, router, clock=clock, rng=rng))
    health = HealthService()
    reloader = Reloader(live, health, config_path or config.source, environ)
    limit = config.server.max_body_bytes
    access = AccessControl(live, AuditLog(config.logging.audit_log), clock)
    answers = ErrorAnswers(limit, partial(count_refusal, live))
    # Access is decided before the workers' coordination answers a merged report.
    middlewares = [error_middleware(answers, access.check)]
    peers = Peers.from_environment() if config.server.workers > 1 else None
    if peers is not None:
        middlewares.append(peers.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=limit)
    app[RUNTIME_KEY] = live
    app[RELOADER_KEY] = reloader
    app[ACCESS_KEY] = access
    if peers is not None:
        app[PEERS_KEY] = peers

        async def close_peers(app: web.Application) -> None:
            await peers.close()

        app.on_cleanup.append(close_peers)

    async def upstream_client(app: web.Application) -> AsyncIterator[None]:
        await live.runtime.start()
        yield
        await live.runtime.close()

    async def health_checks(app: web.Application) -> AsyncIterator[None]:
        async for _ in health.running(live):
            yield

    app.cleanup_ctx.append(upstream_client)
    app.cleanup_ctx.append(health_checks)

    routes = Routes(live)
    expect = partial(expect_continue, limit, partial(count_refusal, live))
    qdrant = QDRANT_PREFIX + "/{tail:.*}"
    data_routes = [
        # Bound with partial rather than a wrapper coroutine: one frame less per resumption.
        # Chat and completions, and vLLM's other JSON routes, routed by their model alike.
        *(
            web.post(path, partial(routes.completion, path=path), expect_handler=expect)
            for path in ("/v1/chat/completions", "/v1/completions", *MODEL_ROUTED_JSON)
        ),
        *(
            web.post(path, partial(routes.model_form, path=path), expect_handler=expect)
            for path in MODEL_ROUTED_FORMS
        ),
        web.post("/v1/embeddings", routes.embeddings, expect_handler=expect),
        web.get("/v1/models", routes.list_models),
        web.get("/v1/models/{model}", routes.get_model),
        web.post("/api/v1/vectors/search", routes.vector_search, expect_handler=expect),
        # Qdrant's REST methods only: TRACE and the like are not passed through (405).
        *(
            web.route(method, qdrant, routes.qdrant_passthrough, expect_handler=expect)
            for method in QDRANT_METHODS
        ),
    ]
    access.add(app, Kind.DATA, data_routes)
    if config.cors.allowed_origins:
        cors = Cors(live, access)
        access.add(app, Kind.PUBLIC, cors.routes(sorted({r.path for r in data_routes})))
        app.on_response_prepare.append(cors.on_prepare)
    else:
        # The same routes, served first by the runner's low-level dispatch (make_runner).
        # Not with CORS on: its headers are added as aiohttp prepares a response, which the
        # low-level dispatch and the gateway's own response framing (runtime.own_framing)
        # do without.
        app[DATA_PLANE_KEY] = DataPlane(data_routes, answers, access.check_data_route)
    admin = AdminApi(live, reloader, access.audit, access.data_port)
    cluster = share_with_workers(app, live, peers, reloader, admin)
    reports = Reports(live)
    app.cleanup_ctx.append(reports.sampling)
    access.add(app, Kind.PUBLIC, admin.public_routes())
    access.add(
        app,
        Kind.READ,
        [
            *admin.read_routes(),
            *reports.routes(),
            *CostAnalysis(live).routes(),
            *RoutingApi(live).routes(),  # its POSTs ask questions, they change nothing
            *cluster.routes(),
        ],
    )
    access.add(app, Kind.PAGE, reports.page_routes())
    access.add(app, Kind.WRITE, admin.write_routes())
    attach_sinks(app, live, config)
    return app


def share_with_workers(
    app: web.Application,
    live: LiveRuntime,
    peers: Peers | None,
    reloader: Reloader,
    admin: AdminApi,
) -> ClusterReport:
    """With several workers: bind the runtime to the table the supervisor set up (in-flight
    counts, limits, spend, hints; cluster.worker_share) and keep runtime overrides in the run
    directory, so a restarted worker starts with the strategy set through the admin API.
    With one worker the overrides are kept in memory, which still counts generations. With
    the redis: section on, the gateway hosts share state too (share_with_hosts). Returns the
    cluster report."""
    share: WorkerShare | None = None
    overrides: OverrideStore
    if peers is None:
        overrides = OverrideMemory()
    else:
        run_dir = str(peers.run_dir)
        share = WorkerShare(SharedTable(run_dir), peers.index, live, live.runtime.clock)
        overrides = OverrideFile(run_dir)
        record = overrides.read()
        if record is not None:
            share.generation = record.generation
            if (
                record.config_digest
                == current_state(live.runtime.router, live.runtime.config).config_digest
            ):
                apply_overrides(live.runtime.router, record)
        runtime = live.runtime
        runtime.sharing = share
        share.bind(runtime)
        background(app, share.run)
        app[SHARE_KEY] = share

    def offer() -> None:
        current = live.runtime
        record = overrides.offer(current_state(current.router, current.config))
        if share is not None:
            share.generation = record.generation

    admin.on_strategy_change.append(offer)
    reloader.on_reload.append(offer)
    report = ClusterReport(
        live,
        share,
        (lambda: share.generation) if share is not None else lambda: overrides.generation,
    )
    if live.runtime.config.redis.enabled:
        report.hosts = share_with_hosts(app, live, share, overrides, peers)
    return report


def share_with_hosts(
    app: web.Application,
    live: LiveRuntime,
    share: WorkerShare | None,
    overrides: OverrideStore,
    peers: Peers | None,
) -> HostsReport:
    """The redis: section: this worker becomes a member on its own (cluster.redis_sync), so
    the worker table stops settling limits and spend (the Redis sync counts the sibling
    workers among the members). Its metrics go to the app's registry (attach_sinks)."""
    config = live.runtime.config
    if share is not None:
        share.sync_limits_and_spend = False

    def adopted(record: OverrideRecord) -> None:
        if share is not None:
            share.generation = max(share.generation, record.generation)

    member = Member.this_process(config.server.port, peers.index if peers is not None else 0)
    sync = RedisSync(config.redis, live, overrides, member, adopted, live.runtime.clock)
    app[COLLECTORS_KEY] = [*app.get(COLLECTORS_KEY, []), sync.metrics]
    background(app, sync.run)
    return sync.report


def background(app: web.Application, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `run()` as a task while the app runs (started, not awaited: nothing it does can
    hold up start-up), cancelled at cleanup."""

    async def running(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(running)


async def start_admin_listener(runner: web.AppRunner) -> str | None:
    """The admin plane's own listener (admin.listen), on the gateway's runner: it answers the
    admin routes, health and metrics, not the proxied API. None when not configured."""
    app = runner.app
    config = app[RUNTIME_KEY].runtime.config
    listen = config.admin.listen
    if not listen:
        return None
    before = set(runner.addresses)
    site: web.BaseSite
    if listen.startswith(("unix:", "/")):
        path = listen.removeprefix("unix:")
        site, host = web.UnixSite(runner, path), ""
    else:
        parts = urlsplit(f"//{listen}")
        host = parts.hostname or ""
        site = web.TCPSite(runner, host, parts.port)
    await site.start()
    for address in set(runner.addresses) - before:
        app[ACCESS_KEY].listening(address, admin=True, host=host)
    return site.name


def serving_on(app: web.Application, address: Any, host: str) -> None:
    """The main listener's address, once bound (chaos bursts and Host checks use its port)."""
    app[ACCESS_KEY].listening(address, admin=False, host=host)


def count_refusal(live: LiveRuntime, status: int) -> None:
    """A request answered with an error before routing (the error middleware, or aiohttp's
    parser through proxy.server): telemetry counts it by status."""
    live.runtime.telemetry.refused_before_routing(status)


async def expect_continue(
    limit: int, count_refusal: Callable[[int], None], request: web.Request
) -> web.StreamResponse | None:
    """`Expect: 100-continue`: a body announced over the limit is refused with 413 at once,
    before the client sends it (aiohttp would invite it with 100 Continue first)."""
    length = request.content_length
    if length is not None and length > limit:
        count_refusal(413)
        response = error_response(
            413,
            f"request body is larger than the limit of {limit} bytes",
            "invalid_request_error",
            "payload_too_large",
            {"x-router-backend": "none", "x-router-attempts": "0"},
        )
        response.force_close()  # the body will not be read
        return response
    if request.version != HttpVersion11:  # HTTP/1.0 has no interim answers
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(
            417, "only Expect: 100-continue is supported", "invalid_request_error", "expectation"
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not the response
    return None


def make_runner(app: web.Application, **options: Any) -> web.AppRunner:
    """The runner to serve a gateway app with: aiohttp's, whose protocol answers requests its
    parser refuses as JSON and counts them, and guards against slow and greedy clients, and
    whose low-level server dispatches the proxied API's routes itself (proxy.server; restart
    to change its limits)."""
    live = app[RUNTIME_KEY]
    server = live.runtime.config.server
    limits = ClientLimits(server.header_timeout, server.max_connections_per_client)
    # After an early error (413, 408) aiohttp reads on what the client still sends, so the
    # client sees the answer rather than a reset; 2 s instead of its 10 bounds how long a
    # silent client holds the connection after its 408.
    options.setdefault("lingering_time", LINGERING_SECONDS)
    return GatewayRunner(
        app,
        count_refusal=partial(count_refusal, live),
        limits=limits,
        data_plane=app.get(DATA_PLANE_KEY),
        **options,
    )


def attach_sinks(app: web.Application, live: LiveRuntime, config: Config) -> None:
    """What consumes each finished request's outcome: SQL accounting, the access log and
    Prometheus. Attached here only; the request path knows them as telemetry sinks."""
    runtime = live.runtime
    store = store_for(config.accounting)
    if store is not None:
        accountant = Accountant(store, config.accounting)
        runtime.accountant = accountant
        runtime.telemetry.sinks.append(accountant.add)

        async def accounting(app: web.Application) -> AsyncIterator[None]:
            async for _ in accountant.running():
                # The budget counts what was spent before the gateway started, too (with
                # several workers, as the first of them read it: the others' spend since
                # then comes through the shared table).
                period = live.runtime.spend_period
                recorded = await accountant.store.total_cost(since=period.start)
                share = app.get(SHARE_KEY)
                live.runtime.spend_offset = (
                    share.table.spend_base(recorded, period.key) if share is not None else recorded
                )
                yield

        app.cleanup_ctx.append(accounting)
    if config.logging.access_log:
        access_log = AccessLog(config.logging.access_log)
        runtime.telemetry.sinks.append(access_log.add)

        async def access_logging(app: web.Application) -> AsyncIterator[None]:
            async for _ in access_log.running():
                yield

        app.cleanup_ctx.append(access_logging)
    if config.metrics.enabled:
        metrics = PrometheusMetrics(live)
        for collector in app.get(COLLECTORS_KEY, []):
            metrics.registry.register(collector)
        runtime.telemetry.sinks.append(metrics.observe)
        runtime.gap_series = metrics.gap_series
        app[ACCESS_KEY].add(app, Kind.PUBLIC, [web.get("/metrics", metrics.handler)])
