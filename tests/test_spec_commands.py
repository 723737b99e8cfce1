"""The specification's validation commands, run as written against a real gateway: ab with a
duplicate Content-Type, the vector search body naming `test`, the breaker test naming a pool,
the failover test against the metrics, and the per-pool distribution."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import subprocess
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.schema import parse
from simulator.cluster import Cluster, start_for_config
from simulator.vectors import add_collection
from tests.conftest import RunningGateway, StartGateway, chat, config_document

AB = shutil.which("ab")
SEARCH = b'{"query_vector": [0.1, 0.2, 0.3], "collection": "test"}'


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def get_json(http, url: str) -> dict:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send two Content-Type headers)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def refused_counts(http, gateway: RunningGateway) -> tuple[dict, dict[str, float]]:
    metrics = await get_json(http, f"{gateway.url}/api/v1/router/metrics")
    async with http.get(f"{gateway.url}/metrics") as response:
        text = await response.text()
    samples = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "router_refused_before_routing"
        for sample in family.samples
    }
    return metrics["refused_before_routing"], samples


async def test_requests_refused_before_routing_are_json_counted_and_logged(
    gateway: RunningGateway, http, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="request_router")
    # What `ab -p FILE -H "Content-Type: application/json"` sends: ab's own type first.
    status, headers, body = await raw_exchange(
        gateway.url,
        b"POST /api/v1/vectors/search HTTP/1.0\r\nContent-length: %d\r\n"
        b"Content-type: text/plain\r\nContent-Type: application/json\r\n"
        b"Host: 127.0.0.1\r\n\r\n%s" % (len(SEARCH), SEARCH),
    )
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert headers["x-router-backend"] == "none" and headers["x-router-attempts"] == "0"
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "malformed_request"
    assert (
        "Duplicate 'Content-Type'" in error["message"] and "-T application/json" in error["message"]
    )
    assert any(
        "refused before routing: 400 Duplicate 'Content-Type'" in r.getMessage()
        and r.levelno == logging.WARNING
        for r in caplog.records
    )
    async with http.get(f"{gateway.url}/no/such/route") as response:
        assert response.status == 404
    async with http.delete(f"{gateway.url}/v1/chat/completions") as response:
        assert response.status == 405
    async with http.post(f"{gateway.url}/v1/chat/completions", data=b"{not json") as response:
        assert response.status == 400
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200  # routed: counted by the routing metrics, not here
    refused, prometheus = await refused_counts(http, gateway)
    assert refused == {"total": 4, "by_status": {"400": 2, "404": 1, "405": 1}}
    assert prometheus == {"400": 2.0, "404": 1.0, "405": 1.0}
    assert any(
        "refused before routing: 404 GET /no/such/route" in r.getMessage() for r in caplog.records
    )


async def test_body_over_the_limit_is_refused_before_routing(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, server={"max_body_bytes": 64}))
    async with http.post(f"{gateway.url}/v1/chat/completions", data=b"x" * 100) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"
    refused, prometheus = await refused_counts(http, gateway)
    assert refused["by_status"] == {"413": 1} and prometheus == {"413": 1.0}


def ab(url: str, body: Path, *options: str) -> dict[str, str]:
    assert AB is not None
    completed = subprocess.run(
        [AB, "-n", "200", "-c", "10", *options, "-p", str(body), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(re.findall(r"^([A-Za-z0-9 -]+):\s+(\S+)", completed.stdout, re.MULTILINE))


@pytest.mark.skipif(AB is None, reason="needs ab (Debian package apache2-utils)")
async def test_ab_as_the_specification_writes_it_and_as_the_readme_does(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path: Path
) -> None:
    for name in ("qdrant-primary", "qdrant-secondary"):
        add_collection(cluster[name].runner.app, "test")
    gateway = await start_gateway(config_document(cluster))
    body = tmp_path / "search_request.json"
    body.write_bytes(SEARCH)
    url = f"{gateway.url}/api/v1/vectors/search"
    # As written: two Content-Type headers; every request refused, and every one counted.
    written = await asyncio.to_thread(ab, url, body, "-H", "Content-Type: application/json")
    assert written["Complete requests"] == "200" and written["Non-2xx responses"] == "200"
    refused, _ = await refused_counts(http, gateway)
    assert refused == {"total": 200, "by_status": {"400": 200}}
    # The README's form: served, split evenly over the qdrant pool.
    working = await asyncio.to_thread(ab, url, body, "-T", "application/json")
    assert working["Complete requests"] == "200" and "Non-2xx responses" not in working
    load = (await get_json(http, f"{gateway.url}/api/v1/router/metrics"))["load_balancing"]
    assert load["backend_distribution"]["qdrant-primary"] == {"requests": 100, "percentage": 50.0}
    assert load["pools"]["qdrant"]["distribution_variance"] == 0.0
    assert load["distribution_variance"] == 0.0


async def test_shares_and_variance_are_per_pool(gateway: RunningGateway, http) -> None:
    search = {"query_vector": [0.1, 0.2, 0.3], "collection": "documents"}
    for _ in range(2):
        async with http.post(f"{gateway.url}/api/v1/vectors/search", json=search) as r:
            assert r.status == 200
    load = (await get_json(http, f"{gateway.url}/api/v1/router/metrics"))["load_balancing"]
    # An exact 50/50 split of the only pool with traffic: 50% each and no spread, whatever
    # the other six backends of the other pools did.
    assert load["backend_distribution"]["qdrant-secondary"] == {"requests": 1, "percentage": 50.0}
    assert load["distribution_variance"] == 0.0
    assert load["pools"]["qdrant"] == {
        "backends": ["qdrant-primary", "qdrant-secondary"],
        "requests": 2,
        "distribution_variance": 0.0,
    }
    for _ in range(2):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
    load = (await get_json(http, f"{gateway.url}/api/v1/router/metrics"))["load_balancing"]
    assert load["backend_distribution"]["hermes-2"] == {"requests": 2, "percentage": 100.0}
    assert load["backend_distribution"]["qdrant-primary"]["percentage"] == 50.0
    models = load["pools"]["models"]
    assert models["requests"] == 2 and models["distribution_variance"] == 1875.0  # 100/0/0/0
    assert load["distribution_variance"] == 937.5  # weighted by requests: (1875*2 + 0*2) / 4


async def test_simulated_qdrant_of_a_config_serves_the_specification_examples(
    start_gateway: StartGateway, http
) -> None:
    """The demo's and `python -m simulator`'s backends: `test` answers as `documents` does."""
    ports = free_ports(3)
    names = ("q-a", "q-b")
    endpoints = [
        {"name": n, "url": f"http://127.0.0.1:{p}"} for n, p in zip(names, ports[:2], strict=True)
    ]
    simulated = await start_for_config(
        parse(
            {
                "models": {"m": {"url": f"http://127.0.0.1:{ports[2]}"}},
                "qdrant": {"endpoints": endpoints},
            },
            {},
        )
    )
    try:
        config = {
            "server": {"host": "127.0.0.1", "port": 0},
            "health_check": {"enabled": False},
            "accounting": {"enabled": False},
            "logging": {"audit_log": None},
            "models": {"m": {"url": simulated["m"].url}},
            "qdrant": {"endpoints": [{"name": n, "url": simulated[n].url} for n in ("q-a", "q-b")]},
        }
        gateway = await start_gateway(config)
        for collection in ("test", "documents"):
            async with http.post(
                f"{gateway.url}/api/v1/vectors/search",
                data=SEARCH.replace(b'"test"', f'"{collection}"'.encode()),
            ) as response:
                assert response.status == 200, await response.text()
                assert len((await response.json())["result"]) == 10
        async with http.post(
            f"{gateway.url}/api/v1/vectors/search",
            data=SEARCH.replace(b'"test"', b'"missing"'),
        ) as response:
            assert response.status == 404  # unknown collections are still Qdrant's 404
    finally:
        await simulated.stop()
