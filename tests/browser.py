"""Headless Chromium (Debian's package) through Playwright, for the tests that need a real
browser (the dashboard, CORS)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; .ci/run installs it)"
)


@asynccontextmanager
async def chromium_page(height: int = 720) -> AsyncIterator[Page]:
    """A page 1280 pixels wide in a browser of its own, closed afterwards."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield await browser.new_page(viewport={"width": 1280, "height": height})
        finally:
            await browser.close()
