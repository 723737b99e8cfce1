"""The dashboard in a real browser: headless Chromium (Debian's package) via Playwright."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Chromium as root, offline: no sandbox, and none of the background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; .ci/run installs it)"
)


async def test_dashboard_renders_live_numbers_and_switches_strategy(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    from playwright.async_api import async_playwright

    gateway = await start_gateway(config_document(cluster))
    cluster["openchat-3.5"].behaviour.token_delay = 0.005

    async def traffic() -> None:
        for index in range(40):
            body = chat("auto", stream=index % 4 == 0)
            async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
                await r.read()
            await asyncio.sleep(0.05)

    load = asyncio.create_task(traffic())
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
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
        finally:
            await browser.close()


async def test_dashboard_page_is_self_contained(gateway, http) -> None:
    async with http.get(f"{gateway.url}/dashboard") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        page = await response.text()
    assert "<script>" in page and "http://" not in page and "https://" not in page
