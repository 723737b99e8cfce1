"""The dashboard in a real browser: headless Chromium (Debian's package) via Playwright."""

from __future__ import annotations

import asyncio
from pathlib import Path

from simulator.cluster import Cluster
from tests.browser import chromium_page, needs_chromium
from tests.conftest import StartGateway, chat, config_document

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = needs_chromium


async def test_dashboard_renders_live_numbers_and_switches_strategy(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster))
    cluster["openchat-3.5"].behaviour.token_delay = 0.005

    async def traffic() -> None:
        for index in range(40):
            body = chat("auto", stream=index % 4 == 0)
            async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
                await r.read()
            await asyncio.sleep(0.05)

    load = asyncio.create_task(traffic())
    async with chromium_page(height=900) as page:
        await page.goto(f"{gateway.url}/dashboard")
        await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 2")
        await load
        await page.wait_for_function(
            "Number(document.getElementById('total').textContent) >= 40", timeout=10_000
        )
        rows = page.locator("#backends tr")
        assert await rows.count() == 8
        hermes = page.locator("tr[data-backend='hermes-2'] td")
        assert await hermes.nth(2).text_content() == "healthy"
        assert int(await hermes.nth(7).text_content()) == 10  # round robin over four
        # Shares are of the backend's own pool: a quarter of the model traffic, however
        # quiet the qdrant and embedding pools are; an even split has no spread.
        assert await hermes.nth(8).text_content() == "25.0%"
        spread = await page.text_content("#pool-variance")
        assert spread is not None and "models 0.0 (40 requests)" in spread
        assert await page.text_content("#refused") == "0"
        assert float(await page.text_content("#rps")) > 0
        # The charts draw the server's history: one point every 2 s.
        await page.wait_for_function(
            "Number(document.body.dataset.historyPoints || 0) >= 2", timeout=10_000
        )
        for chart in ("chart-rps", "chart-latency", "chart-queue"):
            points = await page.get_attribute(f"#{chart}", "data-points")
            assert points is not None and int(points) >= 2
        assert await page.text_content("#strategy-current") == "round_robin"

        await page.select_option("#strategy-select", "least_connections")
        await page.click("#strategy-apply")
        await page.wait_for_function(
            "document.getElementById('strategy-current').textContent === 'least_connections'"
        )
        assert "switched round_robin → least_connections" in await page.text_content("#message")
        assert gateway.router.strategy == "least_connections"
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


async def test_dashboard_page_is_self_contained(gateway, http) -> None:
    async with http.get(f"{gateway.url}/dashboard") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        page = await response.text()
    assert "<script>" in page and "http://" not in page and "https://" not in page


async def test_a_freshly_opened_page_shows_the_servers_history_at_once(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """The charts come from the gateway's own history (sampled every 2 s whether or not a
    page is open), so a page opened after the traffic draws it on its first refresh: time
    axes, responses by status code, retries and the other events, per-pool shares."""
    gateway = await start_gateway(config_document(cluster, retry={"max_retries": 0}))
    cluster["phi-3-mini"].behaviour.status = 503
    for index in range(12):
        model = "phi-3-mini" if index % 4 == 0 else "hermes-2"
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat(model)) as r:
            await r.read()
    for _ in range(100):  # until the server holds three points, the traffic in them
        async with http.get(f"{gateway.url}/api/v1/router/history") as response:
            history = await response.json()
        if len(history["t"]) >= 3 and sum(history["requests_per_second"]) * 2 == 12:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"no history after 20 s: {history}")

    async with chromium_page(height=1400) as page:
        await page.goto(f"{gateway.url}/dashboard")
        await page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1")
        assert int(await page.evaluate("document.body.dataset.historyPoints")) >= 3

        async def drawn(chart: str, attribute: str) -> str:
            value = await page.get_attribute(f"#{chart}", f"data-{attribute}")
            assert value is not None, (chart, attribute)
            return value

        for chart in ("chart-rps", "chart-status", "chart-events", "chart-queue"):
            assert int(await drawn(chart, "points")) >= 3, chart  # one per point
            assert len((await drawn(chart, "ticks")).split()) >= 2, chart  # time labels
        # Latency only where requests finished: p50 and p99 of the busy interval at least.
        assert int(await drawn("chart-latency", "points")) >= 2
        assert (await drawn("chart-status", "lines")).split(",") == ["200", "503"]
        events = (await drawn("chart-events", "lines")).split(",")
        assert {"retries", "fallbacks", "shed", "rate limited", "failovers"} <= set(events)
        share_lines = (await drawn("chart-share-models", "lines")).split(",")
        assert set(share_lines) == {"mixtral-8x7b", "hermes-2", "openchat-3.5", "phi-3-mini"}
        assert int(await drawn("chart-share-models", "points")) >= 4
        assert await page.text_content("#by-status") == "responses by status: 200 × 9, 503 × 3"
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-history.png"), full_page=True)
