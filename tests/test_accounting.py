"""Request accounting in SQLite and PostgreSQL, and the cost analysis built on it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import closing

import asyncpg
import pytest

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document
from tests.postgres import postgres_server, server_binaries


async def traffic(http, url: str) -> None:
    for _ in range(2):
        async with http.post(f"{url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
    body = chat("phi-3-mini", stream=True) | {"stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        await r.read()
    async with http.post(f"{url}/v1/chat/completions", json=chat("gpt-17")) as r:
        assert r.status == 404  # refused before routing: not a routed request


async def test_sqlite_rows_appear_after_traffic(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    path = tmp_path / "requests.db"
    gateway = await start_gateway(
        config_document(
            cluster, accounting={"enabled": True, "sqlite_path": str(path), "flush_interval": 0.05}
        )
    )
    await traffic(http, gateway.url)
    await asyncio.sleep(0.3)  # the background flush runs every 50 ms
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT model, backend, status, stream, prompt_tokens, completion_tokens, cost,"
            " attempts, latency_ms > 0 FROM requests ORDER BY ts"
        ).fetchall()
    assert rows == [
        ("hermes-2", "hermes-2", 200, 0, 1, 8, 0.0018, 1, 1),
        ("hermes-2", "hermes-2", 200, 0, 1, 8, 0.0018, 1, 1),
        ("phi-3-mini", "phi-3-mini", 200, 1, 1, 8, 0.0004, 1, 1),
    ]


async def test_cost_analysis_reports_spend_budget_and_savings(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    gateway = await start_gateway(
        config_document(
            cluster,
            accounting={
                "enabled": True,
                "sqlite_path": str(tmp_path / "r.db"),
                "flush_interval": 60,
            },
            budget={"limit": 0.01},
        )
    )
    await traffic(http, gateway.url)
    async with http.get(f"{gateway.url}/routing/cost-analysis") as response:
        assert response.status == 200
        report = await response.json()
    assert report["spend_by_model"]["hermes-2"]["requests"] == 2
    assert report["spend_by_model"]["hermes-2"]["cost"] == 0.0036
    assert report["spend_by_model"]["phi-3-mini"]["completion_tokens"] == 8
    [day] = report["spend_by_day"].values()
    assert day["requests"] == 3 and day["cost"] == 0.004
    assert report["budget"] == {
        "limit": 0.01,
        "period": "none",
        "period_start": None,
        "used": 0.004,
        "remaining": 0.006,
        "used_percentage": 40.0,
    }
    [hermes] = [r for r in report["recommendations"] if r["model"] == "hermes-2"]
    assert hermes["cheaper_model"] == "phi-3-mini"
    assert hermes["potential_saving"] == pytest.approx(2 * (0.0018 - 0.0004))


async def test_full_buffer_drops_and_counts_rather_than_blocks(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    path = tmp_path / "requests.db"
    gateway = await start_gateway(
        config_document(
            cluster,
            accounting={
                "enabled": True,
                "sqlite_path": str(path),
                "buffer_size": 2,
                "flush_interval": 60,
            },
        )
    )
    for _ in range(5):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200
    accountant = gateway.runtime.accountant
    assert accountant.dropped == 3 and len(accountant.buffer) == 2
    async with http.get(f"{gateway.url}/api/v1/router/metrics") as response:
        assert (await response.json())["accounting"]["dropped"] == 3


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    if server_binaries() is None:
        pytest.skip(
            "PostgreSQL server not installed (Debian package `postgresql`; .ci/run installs it)"
        )
    with postgres_server() as dsn:
        yield dsn


async def test_postgresql_rows_appear_after_traffic(
    cluster: Cluster, start_gateway: StartGateway, http, postgres_dsn: str
) -> None:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute("DROP TABLE IF EXISTS requests")
    finally:
        await connection.close()
    gateway = await start_gateway(
        config_document(
            cluster,
            accounting={"enabled": True, "postgres_dsn": postgres_dsn, "flush_interval": 0.05},
        )
    )
    await traffic(http, gateway.url)
    await asyncio.sleep(0.3)
    connection = await asyncpg.connect(postgres_dsn)
    try:
        rows = await connection.fetch(
            "SELECT model, status, stream, completion_tokens, cost FROM requests ORDER BY ts"
        )
    finally:
        await connection.close()
    assert [tuple(r) for r in rows] == [
        ("hermes-2", 200, False, 8, 0.0018),
        ("hermes-2", 200, False, 8, 0.0018),
        ("phi-3-mini", 200, True, 8, 0.0004),
    ]
    async with http.get(f"{gateway.url}/routing/cost-analysis") as response:
        report = await response.json()
    assert report["accounting"]["store"] == "postgresql"
    assert report["spend_by_model"]["hermes-2"]["requests"] == 2
