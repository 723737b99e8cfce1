"""Who may use which route (control.access; issue 11, items 5 and 6): the admin plane against
DNS rebinding, cross-site pages and simple requests; the admin listener; reads that need the
token; bad tokens throttled and audited; client keys as the per-client rate limit's identity."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from config.reader import ConfigError
from config.schema import parse
from proxy.app import (
    ACCESS_KEY,
    RUNNER_OPTIONS,
    RUNTIME_KEY,
    build_app,
    make_runner,
    serving_on,
    start_admin_listener,
)
from proxy.runtime import LiveRuntime
from simulator.cluster import Cluster, serve
from tests.conftest import ManualClock, StartGateway, chat, config_document

STRATEGY = "/api/v1/router/strategy"
JSON = {"Content-Type": "application/json"}
SWITCH = orjson.dumps({"strategy": "least_connections"})


def outside_address() -> str | None:
    """This host's address on its network: a peer connecting from it is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # no packet is sent: this picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **options) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body


async def test_dns_rebinding_cross_site_pages_and_simple_requests_cannot_change_anything(
    gateway, http
) -> None:
    """The shipped default (no token): loopback may change things, but only when the Host
    names this listener, the Origin (if any) is that host, and the body is JSON."""
    port = gateway.url.rsplit(":", 1)[1]
    url = gateway.url + STRATEGY
    rebound = {**JSON, "Host": f"rebind.evil.example:{port}"}
    status, body = await status_of(http, "PUT", url, data=SWITCH, headers=rebound)
    assert status == 403 and body["error"]["code"] == "host_not_allowed"
    status, body = await status_of(
        http, "GET", gateway.url + "/api/v1/router/backends", headers=rebound
    )
    assert status == 403  # a rebinding page reads nothing either
    cross_site = {**JSON, "Origin": "http://evil.example"}
    status, body = await status_of(http, "PUT", url, data=SWITCH, headers=cross_site)
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    for method, path, data in (
        ("PUT", STRATEGY, SWITCH),  # a form or fetch() with no preflight: text/plain
        ("POST", "/api/v1/router/reload", b"x"),
        ("POST", "/api/v1/router/reload", None),  # no body, and nothing a page cannot send
    ):
        headers = {"Content-Type": "text/plain"} if data else {}
        status, body = await status_of(http, method, gateway.url + path, data=data, headers=headers)
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", path
    assert gateway.router.strategy == "round_robin"
    async with http.get(gateway.url + "/health", headers=rebound) as response:
        assert response.status == 200  # load balancers may name the gateway as they like

    same_origin = {**JSON, "Origin": gateway.url, "Host": f"localhost:{port}"}
    same_origin["Origin"] = f"http://localhost:{port}"
    status, _ = await status_of(http, "PUT", url, data=SWITCH, headers=same_origin)
    assert status == 200 and gateway.router.strategy == "least_connections"
    status, body = await status_of(
        http, "POST", gateway.url + "/api/v1/router/reload", headers=JSON
    )
    assert status == 400 and "no config file" in body["error"]["message"]  # it got through


@pytest.fixture
async def start_listening() -> AsyncIterator[Callable[..., Awaitable[tuple[str, LiveRuntime]]]]:
    """A gateway served as `request-router serve` serves it: the main listener (on `host`)
    and, when configured, the admin listener, on one runner."""
    runners: list[web.AppRunner] = []

    async def start(document: dict[str, Any], host: str = "127.0.0.1", **env: str) -> Any:
        config = parse(document, env)
        app = build_app(config)
        runner, port = await serve(app, host, 0, make_runner, **RUNNER_OPTIONS)
        runners.append(runner)
        serving_on(app, (host, port), host)
        await start_admin_listener(runner)
        return f"http://127.0.0.1:{port}", app

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_the_admin_listener_serves_the_admin_plane_and_the_main_port_keeps_it_local(
    cluster: Cluster, start_listening, http
) -> None:
    document = config_document(cluster, admin={"listen": "127.0.0.1:0"}, chaos={"enabled": True})
    main, app = await start_listening(document, host="0.0.0.0")
    access = app[ACCESS_KEY]
    [admin_port] = [p for p, listener in access.listeners.items() if listener.admin]
    admin = f"http://127.0.0.1:{admin_port}"
    for path in (
        "/api/v1/router/backends",
        "/api/v1/router/state",
        "/dashboard",
        "/health",
        "/metrics",
        "/routing/load",
    ):
        async with http.get(admin + path) as response:
            assert response.status == 200, path
    status, body = await status_of(http, "POST", admin + "/v1/chat/completions", json=chat())
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _ = await status_of(http, "PUT", admin + STRATEGY, data=SWITCH, headers=JSON)
    assert status == 200
    # The chaos burst still goes through the proxied API's own port.
    status, body = await status_of(
        http,
        "POST",
        admin + "/api/v1/router/failover/test",
        json={"primary_backend": "hermes-2", "requests": 4},
    )
    assert status == 200 and body["failover_test"]["requests_during_failover"] == 4

    # The specification's admin paths still answer loopback on the main port.
    for method, path, data in (("GET", "/api/v1/router/backends", None), ("PUT", STRATEGY, SWITCH)):
        status, _ = await status_of(http, method, main + path, data=data, headers=JSON)
        assert status == 200, path
    outside = outside_address()
    if outside is None:
        pytest.skip("no non-loopback address to connect from")
    remote = main.replace("127.0.0.1", outside)
    for path in (
        "/api/v1/router/backends",
        "/api/v1/router/state",
        "/routing/cost-analysis",
        "/dashboard",
    ):
        status, body = await status_of(http, "GET", remote + path)
        assert status == 403, path
    for path in ("/health", "/health/ready"):
        async with http.get(remote + path) as response:
            assert response.status == 200
    status, _ = await status_of(http, "POST", remote + "/v1/chat/completions", json=chat())
    assert status == 200


async def test_an_admin_listener_on_a_unix_socket(
    cluster: Cluster, start_listening, tmp_path
) -> None:
    path = tmp_path / "admin.sock"
    main, app = await start_listening(config_document(cluster, admin={"listen": f"unix:{path}"}))
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as unix:
        # Browsers cannot reach a Unix socket and DNS plays no part: any Host will do (Caddy).
        async with unix.get("http://router/api/v1/router/backends") as response:
            assert response.status == 200
        async with unix.put("http://router" + STRATEGY, data=SWITCH, headers=JSON) as response:
            assert response.status == 200
        async with unix.post("http://router/v1/chat/completions", json=chat()) as response:
            assert response.status == 404
    assert app[RUNTIME_KEY].runtime.router.strategy == "least_connections"


async def test_reads_can_require_the_token(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster, admin={"reads": "token"}), environ={"ROUTER_ADMIN_TOKEN": "t0k"}
    )
    token = {"Authorization": "Bearer t0k"}
    for path in ("/api/v1/router/backends", "/api/v1/router/metrics", "/routing/load", STRATEGY):
        status, body = await status_of(http, "GET", gateway.url + path)
        assert status == 401 and body["error"]["code"] == "unauthorized", path
        status, _ = await status_of(http, "GET", gateway.url + path, headers=token)
        assert status == 200, path
    for path in ("/health", "/health/live", "/metrics", "/dashboard"):  # a page has no state
        async with http.get(gateway.url + path) as response:
            assert response.status == 200, path


async def test_bad_admin_tokens_are_throttled_per_peer_and_audited(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    audit = tmp_path / "audit.jsonl"
    clock = ManualClock()
    document = config_document(
        cluster, admin={"max_token_failures": 3}, logging={"audit_log": str(audit)}
    )
    gateway = await start_gateway(document, {"ROUTER_ADMIN_TOKEN": "s3cret"}, clock)
    backends = gateway.url + "/api/v1/router/backends"
    good, bad = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer guess"}
    assert (await status_of(http, "GET", backends, headers=bad))[0] == 401
    for _ in range(2):
        status, _ = await status_of(
            http, "PUT", gateway.url + STRATEGY, data=SWITCH, headers={**JSON, **bad}
        )
        assert status == 401
    async with http.get(backends, headers=good) as response:  # even the right one waits
        assert response.status == 429 and response.headers["Retry-After"] == "60"
        assert (await response.json())["error"]["code"] == "too_many_token_failures"
    async with http.get(backends) as response:  # reads are open: without a token, no guess
        assert response.status == 200
    clock.advance(60.5)
    status, _ = await status_of(
        http, "PUT", gateway.url + STRATEGY, data=SWITCH, headers={**JSON, **good}
    )
    assert status == 200
    entries = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    assert [(e["action"], e["accepted"]) for e in entries] == [
        ("GET /api/v1/router/backends", False),
        ("strategy", False),
        ("strategy", False),
        ("strategy", True),
    ]
    assert "refused for a minute" in entries[2]["reason"]
    assert "guess" not in audit.read_text() and "s3cret" not in audit.read_text()


async def test_configured_client_keys_are_the_per_client_identity(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Issue 11, item 6: with auth.api_keys the per-client limit keys on the verified client,
    and a key nobody configured is refused (401, as LiteLLM answers) before any limit."""
    gateway = await start_gateway(
        config_document(
            cluster,
            auth={"api_keys": {"alice": "sk-alice", "bob": "sk-bob"}},
            rate_limit={"per_client_rps": 1, "per_client_burst": 2},
        )
    )
    url = gateway.url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer sk-invented"}, {"X-API-Key": "sk-other"}):
        async with http.post(url, json=chat(), headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"]["code"] == "invalid_api_key"
    async with http.get(gateway.url + "/v1/models") as response:
        assert response.status == 401
    assert sum(b.behaviour.requests for b in cluster.backends.values()) == 0
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"X-API-Key": "sk-bob"}
    seen = []
    for headers in (alice, alice, alice, bob, bob):
        async with http.post(url, json=chat(), headers=headers) as response:
            seen.append(response.status)
    assert seen == [200, 200, 429, 200, 200]  # bob's bucket is his own, on the same peer
    assert gateway.runtime.rate_limiter.clients.keys() == {"client:alice", "client:bob"}
    async with http.get(gateway.url + "/health") as response:
        assert response.status == 200


def test_admin_and_client_key_settings_are_checked_when_read() -> None:
    config = parse({}, {"ROUTER_API_KEYS": "alice=sk-a, bob=sk-b", "ROUTER_ADMIN_LISTEN": "/run/a"})
    assert config.auth.api_keys == (("alice", "sk-a"), ("bob", "sk-b"))
    assert config.admin.listen == "/run/a"
    for document, message in (
        ({"auth": {"api_keys": {"a": "k", "b": "k"}}}, r"auth\.api_keys\.b: the same key as"),
        ({"auth": {"api_keys": {"a": ""}}}, r"auth\.api_keys\.a: expected a non-empty string"),
        ({"admin": {"listen": "8001"}}, r"admin\.listen: expected host:port or unix:/path"),
        ({"admin": {"listen": "unix:run/a"}}, r"admin\.listen: a Unix socket needs an absolute"),
        ({"admin": {"reads": "everyone"}}, r"admin\.reads: expected 'open' or 'local' or"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse(document, {})
