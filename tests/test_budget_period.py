"""Budgets with a period (issue 12): the spend counted starts again each UTC day or month."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime

from config.schema import parse
from proxy.budget_period import SpendPeriod, period_bounds
from proxy.router import Router
from proxy.runtime import Runtime
from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_periods_are_utc_days_and_months() -> None:
    assert period_bounds("daily", epoch("2026-11-30T13:05:00")) == (
        20261130,
        epoch("2026-11-30T00:00:00"),
        epoch("2026-12-01T00:00:00"),
    )
    assert period_bounds("monthly", epoch("2026-12-31T23:59:59")) == (
        202612,
        epoch("2026-12-01T00:00:00"),
        epoch("2027-01-01T00:00:00"),
    )
    key, start, end = period_bounds("none", epoch("2026-11-30T13:05:00"))
    assert (key, start, end) == (0, 0.0, float("inf"))


def test_the_budget_counts_only_the_current_day() -> None:
    now = [epoch("2026-11-30T23:59:00")]
    config = parse({"models": {"m": {"url": "http://127.0.0.1:9"}}, "budget": {"period": "daily"}})
    runtime = Runtime(config, Router(config), wall=lambda: now[0])
    runtime.spend_offset = 2.0  # accounted earlier today, before this process started
    runtime.telemetry.cost_total = 1.5
    runtime.spend_elsewhere = 0.5  # the other workers', today
    assert runtime.spent() == 4.0
    now[0] = epoch("2026-12-01T00:00:01")  # midnight UTC: a new budget
    assert runtime.spent() == 0.0
    runtime.telemetry.cost_total = 1.75
    assert runtime.spent() == 0.25 and runtime.period_spend() == 0.25
    assert runtime.spend_period.key == 20261201
    reloaded = runtime.reloaded(config, Router(config))
    assert reloaded.spent() == 0.25  # a reload keeps the period and its base


def test_a_period_unchanged_by_a_reload_is_kept() -> None:
    period = SpendPeriod("daily")
    period.base = 3.0
    assert period.reconfigured("daily") is period
    monthly = period.reconfigured("monthly")
    assert monthly.period == "monthly" and monthly.base == 3.0


async def test_accounted_spend_of_earlier_days_does_not_count(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    """Rows the accounting database holds from yesterday are not today's budget: a gateway
    started with `period: daily` counts today's rows only."""
    path = tmp_path / "r.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE requests (request_id TEXT, ts REAL, route TEXT, pool TEXT, model TEXT,"
        " backend TEXT, status INTEGER, stream INTEGER, latency_ms REAL, ttft_ms REAL,"
        " overhead_ms REAL, queue_wait_ms REAL, prompt_tokens INTEGER,"
        " completion_tokens INTEGER, cost REAL, attempts INTEGER, fallback INTEGER)"
    )
    now = time.time()
    for ts, cost in ((now - 86400 * 2, 5.0), (now - 86400, 7.0), (now - 1, 0.25)):
        db.execute(
            "INSERT INTO requests (request_id, ts, model, cost) VALUES ('r', ?, 'hermes-2', ?)",
            (ts, cost),
        )
    db.commit()
    db.close()
    accounting = {"enabled": True, "sqlite_path": str(path), "flush_interval": 60}
    daily = await start_gateway(
        config_document(cluster, accounting=accounting, budget={"limit": 1, "period": "daily"})
    )
    async with http.post(f"{daily.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
    async with http.get(f"{daily.url}/routing/cost-analysis") as response:
        budget = (await response.json())["budget"]
    today = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00Z")
    assert budget["period"] == "daily" and budget["period_start"] == today
    assert budget["used"] == 0.25 + 0.0018  # this morning's row and the request just made
    lifetime = await start_gateway(
        config_document(cluster, accounting=accounting, budget={"limit": 100})
    )
    async with http.get(f"{lifetime.url}/routing/cost-analysis") as response:
        assert (await response.json())["budget"]["used"] >= 12.25
