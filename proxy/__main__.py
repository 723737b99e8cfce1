"""Command line: `request-router [--config PATH] [--host H] [--port P] [--check-config] [--demo]`.

Exit codes: 0 ok, 2 invalid configuration or arguments. Under systemd (Type=notify) the
gateway reports READY=1 once listening, RELOADING=1/READY=1 around a SIGHUP reload and
STOPPING=1 when it drains (proxy.systemd_notify).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from aiohttp import web

import native
from config.reader import ConfigError
from config.schema import Config, load
from proxy import __version__
from proxy.app import (
    PEERS_KEY,
    RELOADER_KEY,
    RUNNER_OPTIONS,
    RUNTIME_KEY,
    build_app,
    make_runner,
    serving_on,
    start_admin_listener,
)
from proxy.app_logging import FORMATS, LEVELS
from proxy.app_logging import configure as configure_logging
from proxy.systemd_notify import ready, reloading, stopping

log = logging.getLogger("request_router")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="request-router",
        description="Streaming gateway for OpenAI-compatible LLM servers and Qdrant.",
    )
    parser.add_argument(
        "--config", help="YAML config (default: $ROUTER_CONFIG or config/router_config.yaml)"
    )
    parser.add_argument("--host", help="listen address (overrides config and ROUTER_HOST)")
    parser.add_argument("--port", type=int, help="listen port (overrides config and ROUTER_PORT)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config, print a summary and exit"
    )
    parser.add_argument(
        "--demo", action="store_true", help="also start simulated backends on the configured ports"
    )
    parser.add_argument("--debug", action="store_true", help="debug logging (--log-level debug)")
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=os.environ.get("ROUTER_LOG_LEVEL", "info"),
        help="application log level (default: $ROUTER_LOG_LEVEL or info)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("ROUTER_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line (default: $ROUTER_LOG_FORMAT or text)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (overrides ROUTER_WORKER_THREADS)",
    )
    parser.add_argument("--version", action="version", version=f"request-router {__version__}")
    args = parser.parse_args(argv)
    for name, value, choices in (
        ("ROUTER_LOG_LEVEL", args.log_level, LEVELS),
        ("ROUTER_LOG_FORMAT", args.log_format, FORMATS),
    ):
        if value not in choices:  # a default from the environment, which argparse trusts
            parser.error(f"{name}: invalid choice {value!r} (choose from {', '.join(choices)})")
    return args


def environment_with(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The command line and --demo as the ROUTER_* variables they stand for: they then go
    through the same validation as the file and the environment (a --port of 99999 is refused
    with its key), and a reload re-applies them instead of losing them."""
    overrides = dict(environ)
    if args.host:
        overrides["ROUTER_HOST"] = args.host
    if args.port is not None:
        overrides["ROUTER_PORT"] = str(args.port)
    if args.workers is not None:
        overrides["ROUTER_WORKER_THREADS"] = str(args.workers)
    if args.demo:
        # Simulated backends: the chaos endpoints are for the walk-through, and the demo,
        # with those endpoints on, listens on loopback unless told otherwise.
        overrides["ROUTER_CHAOS_ENABLED"] = "true"
        overrides.setdefault("ROUTER_HOST", "127.0.0.1")
    return overrides


def files_it_cannot_write(config: Config) -> list[str]:
    """The files and sockets the config names that this process could not create or append
    to, each with its key. --check-config looks because under the systemd unit only the
    state, logs and runtime directories are writable (ProtectSystem=strict): without this the
    check passes and the gateway then fails to start, or, for the audit log, fails at the
    first admin change. Relative paths resolve against the working directory, as they do when
    the gateway opens them."""
    admin = config.admin.listen or ""
    wanted: dict[str, tuple[str | None, bool]] = {  # key: (path, the gateway makes its parents)
        "logging.access_log": (config.logging.access_log, False),
        "logging.audit_log": (config.logging.audit_log, True),
        "admin.listen": (
            admin.removeprefix("unix:") if admin.startswith(("unix:", "/")) else None,
            False,
        ),
    }
    if config.accounting.enabled and not config.accounting.postgres_dsn:
        wanted["accounting.sqlite_path"] = (config.accounting.sqlite_path, True)
    user = os.environ.get("USER") or f"uid {os.geteuid()}"  # systemd sets USER from User=
    return [
        f"{key}: cannot create or write {path!r} as {user}"
        for key, (path, makes_parents) in wanted.items()
        if path not in (None, "", "-", ":memory:") and not writable(Path(path), makes_parents)
    ]


def writable(path: Path, makes_parents: bool) -> bool:
    if path.exists():
        return os.access(path, os.W_OK)
    parent = path.absolute().parent
    while makes_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    # access(2) also answers EROFS for a read-only mount, as ProtectSystem= makes them
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def settle_garbage_collector() -> None:
    """Called once the gateway is up. Everything built at start-up (config, routes, pools,
    imported modules) lives as long as the process: freezing it keeps the collector from
    walking it again on every full collection, which showed as the p99 tail (16 ms -> 7 ms at
    50 connections, scripts/bench.py). The request path makes few reference cycles, so the
    youngest generation is collected less often too."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def install_uvloop() -> bool:
    if os.environ.get("ROUTER_EVENT_LOOP", "uvloop") != "uvloop":
        return False
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(config: Config, demo: bool, environ: Mapping[str, str]) -> None:
    cluster = None
    if demo:
        from simulator.demo import print_instructions, start_demo_backends

        cluster = await start_demo_backends(config)
    app = build_app(config, environ=environ)
    live, reloader = app[RUNTIME_KEY], app[RELOADER_KEY]
    runner = make_runner(app, shutdown_timeout=config.server.shutdown_grace, **RUNNER_OPTIONS)
    await runner.setup()
    try:
        peers = app.get(PEERS_KEY)
        site = web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            backlog=2048,
            reuse_port=peers is not None,
        )
        await site.start()
        for address in runner.addresses:
            serving_on(app, address, config.server.host)
        if peers is None or peers.index == 0:  # one worker answers it; it asks the others
            admin = await start_admin_listener(runner)
            if admin is not None:
                log.info("admin listener on %s", admin)
        settle_garbage_collector()
        if peers is not None:  # the siblings' private channel
            await web.UnixSite(runner, peers.socket_path(peers.index)).start()
        log.info(
            "request-router %s listening on http://%s:%d (strategy %s, event loop %s,"
            " request path %s)",
            __version__,
            config.server.host,
            config.server.port,
            config.routing.strategy,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
            native.state(),
        )
        if demo:
            print_instructions(config)
        listening = f"listening on http://{config.server.host}:{config.server.port}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        async def reload() -> None:
            reloading()
            try:
                await reloader.reload_logged()
            finally:  # refused or not, a configuration is serving again
                ready(listening)

        def on_sighup() -> None:
            task = loop.create_task(reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        # Only now: systemd may send SIGHUP or SIGTERM as soon as it reads READY=1, and before
        # the handlers above those would kill the process.
        ready(listening)
        await stop.wait()
        live.runtime.draining = True
        stopping("draining")
        log.info(
            "draining: no new connections; in-flight requests get up to %gs to finish",
            live.runtime.config.server.shutdown_grace,
        )
    finally:
        # Stops listening, lets in-flight requests and streams finish within the grace
        # period (then cancels them), then closes upstream sessions.
        await runner.cleanup()
        if cluster is not None:
            await cluster.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["simulate"]:
        from simulator.strategies import main as simulate

        return simulate(arguments[1:])
    args = parse_args(arguments)
    configure_logging("debug" if args.debug else args.log_level, args.log_format)
    environ = environment_with(args, os.environ)
    try:
        config = load(args.config, environ)
    except ConfigError as exc:
        print(f"request-router: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        problems = files_it_cannot_write(config)
        for problem in problems:
            print(f"request-router: invalid configuration: {problem}", file=sys.stderr)
        if problems:
            return 2
        print(config.summary())
        print("configuration OK")
        return 0
    if args.demo and config.server.workers > 1:
        log.warning("--demo runs one worker (the simulators live in its process)")
        config = replace(config, server=replace(config.server, workers=1))
    if config.server.workers > 1 and "ROUTER_WORKER_INDEX" not in os.environ:
        from cluster.supervisor import supervise

        return supervise(arguments, config.server.workers)
    install_uvloop()
    try:
        asyncio.run(serve(config, args.demo, environ))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"request-router: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
