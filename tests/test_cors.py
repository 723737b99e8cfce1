"""CORS (issue 12) in a real browser: a page on another origin calls the proxied API; the admin
API never answers it. Headless Chromium (Debian's package) via Playwright."""

from __future__ import annotations

from aiohttp import web

from simulator.cluster import Cluster
from tests.browser import chromium_page, needs_chromium
from tests.conftest import StartGateway, config_document

pytestmark = needs_chromium

PAGE = "<!doctype html><title>app</title><p>another site</p>"


async def serve_page() -> tuple[web.AppRunner, str]:
    """A page on an origin of its own (another port is another origin)."""
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


CALLS = """
async ([gateway, model]) => {
  const out = {};
  try {
    const r = await fetch(gateway + "/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer k"},
      body: JSON.stringify({model, messages: [{role: "user", content: "hi"}]}),
    });
    out.chat = {status: r.status, backend: r.headers.get("x-router-backend"),
                content: (await r.json()).choices?.[0]?.message?.content ?? null};
  } catch (e) { out.chat = {error: String(e)}; }
  try {
    const r = await fetch(gateway + "/api/v1/router/strategy", {
      method: "PUT", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({strategy: "random"}),
    });
    out.admin = {status: r.status};
  } catch (e) { out.admin = {error: String(e)}; }
  return out;
}
"""


async def test_an_allowed_origin_calls_the_api_and_never_the_admin(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    runner, origin = await serve_page()
    try:
        gateway = await start_gateway(config_document(cluster, cors={"allowed_origins": [origin]}))
        async with chromium_page() as page:
            await page.goto(origin)
            result = await page.evaluate(CALLS, [gateway.url, "hermes-2"])
        assert result["chat"]["status"] == 200, result
        assert result["chat"]["backend"] == "hermes-2"  # an exposed header the page can read
        assert result["chat"]["content"]
        assert "error" in result["admin"]  # the browser got no CORS answer: a network error
        async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
            assert (await response.json())["strategy"] == "round_robin"  # unchanged
    finally:
        await runner.cleanup()


async def test_another_origin_is_refused_its_preflight(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster, cors={"allowed_origins": ["https://app.example"]})
    )
    url = f"{gateway.url}/v1/chat/completions"
    asked = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(url, headers={"Origin": "https://app.example", **asked}) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert response.headers["Access-Control-Allow-Methods"] == "POST"
        assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    async with http.options(url, headers={"Origin": "https://evil.example", **asked}) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
        assert (await response.json())["error"]["code"] == "origin_not_allowed"
    with_cookie = {**asked, "Access-Control-Request-Headers": "x-secret"}
    async with http.options(url, headers={"Origin": "https://app.example", **with_cookie}) as r:
        assert r.status == 403
    async with http.options(
        f"{gateway.url}/api/v1/router/strategy",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"},
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers  # never the admin API


async def test_without_allowed_origins_no_cors_is_answered(gateway, http) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with http.options(f"{gateway.url}/v1/chat/completions", headers=headers) as response:
        assert response.status == 405
        assert "Access-Control-Allow-Origin" not in response.headers
