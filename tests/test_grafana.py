"""The Grafana dashboard (deploy/grafana/request-router.json): every panel's PromQL is run by a
real Prometheus (Debian's `prometheus`) scraping a real gateway with two workers, after
traffic that moves what the panels show."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import ROOT, free_port, gateway_process

DASHBOARD = ROOT / "deploy" / "grafana" / "request-router.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# What Grafana puts in place of its variables: a window holding the whole run, every host.
VARIABLES = {"$__rate_interval": "30s", "$__range": "5m", "$instance": ".*"}
# Panels whose series exist but whose values this run leaves at zero (nothing is retried,
# shed, rate limited, refused by the queue, in flight at the end, or restarted): their queries
# are checked to run and return series, not for a value above zero.
ZERO_IN_THIS_RUN = {
    "Retries, failovers and refusals",
    "Queue depth and in flight",
    "Queue refusals and timeouts",
    "Backend in flight",
    "Worker restarts",
}


def panels() -> list[dict[str, Any]]:
    document = json.loads(DASHBOARD.read_text())
    return [panel for panel in document["panels"] if panel["type"] != "row"]


def expression(target: dict[str, Any]) -> str:
    expr = str(target["expr"])
    for variable in sorted(VARIABLES, key=len, reverse=True):  # $__range before $instance...
        expr = expr.replace(variable, VARIABLES[variable])
    return expr


def test_the_dashboard_is_well_formed() -> None:
    document = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in document["templating"]["list"]} == {"datasource", "instance"}
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert "$" not in expression(target), (panel["title"], target["expr"])


@asynccontextmanager
async def prometheus(target: str, directory: Path) -> AsyncIterator[str]:
    """A Prometheus scraping `target` every second; yields its URL, stops it by its pid."""
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "request-router", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    with open(directory / "prometheus.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                if process.returncode is not None:
                    break
                try:
                    async with http.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("prometheus did not become ready within 10 s")
        if process.returncode is not None:
            log_text = (directory / "prometheus.log").read_text()
            raise RuntimeError(f"prometheus exited:\n{log_text}")
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def query(http: aiohttp.ClientSession, url: str, promql: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/query", params={"query": promql}) as response:
        document: dict[str, Any] = await response.json()
    assert document["status"] == "success", (promql, document)
    return document


async def scalar(http: aiohttp.ClientSession, url: str, promql: str) -> float:
    result = (await query(http, url, promql))["data"]["result"]
    return float(result[0]["value"][1]) if result else math.nan


async def wait_scraped(http: aiohttp.ClientSession, prometheus_url: str, gateway_url: str) -> None:
    """Until Prometheus holds a scrape with every request the gateway has counted so far."""
    async with http.get(f"{gateway_url}/metrics") as response:
        text = await response.text()
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "router_requests_total"
    )
    for _ in range(100):
        if await scalar(http, prometheus_url, "sum(router_requests_total)") >= counted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus did not scrape {counted} requests within 10 s")


async def wave(url: str) -> None:
    """One round of traffic on new connections (spread over both workers): successes with
    tokens and cost, streams (TTFT, gaps), a queue on a one-slot model, a backend's 4xx, a
    failing backend (5xx, its breaker opens) and unknown models (refused before routing)."""
    search = {"query_vector": [0.1, 0.2, 0.3], "collection": "no-such-collection"}

    async def one(path: str, body: dict[str, Any], expected: set[int]) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{url}{path}", json=body) as response:
                await response.read()
                assert response.status in expected, (path, body, response.status)

    completions = "/v1/chat/completions"
    await asyncio.gather(
        *(one(completions, chat("hermes-2"), {200}) for _ in range(4)),
        *(one(completions, chat("openchat-3.5", stream=True), {200}) for _ in range(3)),
        *(one(completions, chat("mixtral-8x7b"), {200}) for _ in range(4)),
        *(one("/api/v1/vectors/search", search, {404}) for _ in range(2)),
        *(one(completions, chat("phi-3-mini"), {500, 502, 503}) for _ in range(6)),
        *(one(completions, chat("no-such-model"), {404}) for _ in range(2)),
    )


@pytest.mark.skipif(
    not Path(PROMETHEUS).exists(), reason="needs Debian's prometheus (apt-get install prometheus)"
)
async def test_every_panel_query_runs_against_a_real_prometheus(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster["phi-3-mini"].behaviour.status = 500
    cluster["mixtral-8x7b"].behaviour.latency = 0.3  # with one slot: requests queue
    cluster["openchat-3.5"].behaviour.token_delay = 0.005  # paced: each token its own chunk
    document = config_document(cluster, circuit_breaker={"threshold": 2})
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    environment = {"ROUTER_WORKER_THREADS": "2"}
    async with (
        gateway_process(document, tmp_path, environment) as gateway,
        prometheus(gateway.url.removeprefix("http://"), tmp_path) as prometheus_url,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(50):  # a first scrape before any traffic
            if await scalar(http, prometheus_url, "up") == 1:
                break
            await asyncio.sleep(0.1)
        # Waves, each scraped, so that a series first seen in one has a rate in the next: the
        # failing model's 5xx series change once its breakers open (no backend chosen).
        for _ in range(3):
            await wave(gateway.url)
            await wait_scraped(http, prometheus_url, gateway.url)

        checked = 0
        for panel in panels():
            for target in panel["targets"]:
                promql = expression(target)
                result = (await query(http, prometheus_url, promql))["data"]["result"]
                assert result, f"{panel['title']}: no series for {promql}"
                if panel["title"] not in ZERO_IN_THIS_RUN:
                    values = [float(series["value"][1]) for series in result]
                    assert any(math.isfinite(v) and v > 0 for v in values), (
                        f"{panel['title']}: {promql} -> {values}"
                    )
                checked += 1
        assert checked == sum(len(panel["targets"]) for panel in panels())
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0
