"""https backends: the gateway verifies them against `connection_pool.ca_file` (a private CA)
or the system's trust store, for requests and health probes alike."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from config.schema import HealthCheckConfig
from health.active import ActiveHealthChecker
from proxy.transport import tls_context
from proxy.verdict import fails_backend
from simulator.cluster import bind_socket
from simulator.models import build_model_app
from tests.conftest import StartGateway, chat

MODEL = "hermes-2"


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(authority: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def https_backend(authority: trustme.CA) -> AsyncIterator[str]:
    """A simulated model server behind a certificate for localhost from the private CA."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)
    runner = web.AppRunner(build_model_app(MODEL), access_log=None)
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0)
    await web.SockSite(runner, sock, ssl_context=server_tls).start()
    yield f"https://localhost:{sock.getsockname()[1]}"
    await runner.cleanup()


def config_for(url: str, ca_file: str | None) -> dict:
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "health_check": {"enabled": False},
        "accounting": {"enabled": False},
        "logging": {"audit_log": None},
        "retry": {"delay": 0, "max_retries": 0},
        "connection_pool": {"ca_file": ca_file},
        "models": {MODEL: {"endpoints": [{"url": url}]}},
    }


async def test_requests_reach_a_backend_with_a_private_ca(
    ca_file: str, https_backend: str, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_for(https_backend, ca_file))
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat(MODEL)) as r:
                assert r.status == 200
                assert (await r.json())["model"] == MODEL


async def test_an_untrusted_certificate_is_refused(
    https_backend: str, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_for(https_backend, None))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat(MODEL)) as r:
            assert r.status == 502
            error = (await r.json())["error"]
    assert error["code"] == "backend_unreachable"
    assert "certificate verify failed" in error["message"]


async def test_health_probes_verify_with_the_same_ca(
    ca_file: str, https_backend: str, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_for(https_backend, ca_file))
    pools = [gateway.router.models[MODEL]]
    config = HealthCheckConfig(enabled=True, interval=60)
    for tls, expected in ((tls_context(ca_file), True), (None, False)):
        checker = ActiveHealthChecker(pools, config, tls=tls, probe_failed=fails_backend)
        checker.start()
        try:
            (probe,) = checker.probes.values()
            assert await checker.check(probe) is expected
        finally:
            await checker.stop()


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    from config.reader import ConfigError
    from config.schema import parse

    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"connection_pool\.ca_file: no such file"):
        parse(config_for("https://localhost:1", missing), {})
