"""Active health checks against real simulated backends: fall and rise thresholds."""

from __future__ import annotations

import random

from config.schema import Config, HealthCheckConfig, parse
from health.active import ActiveHealthChecker
from proxy.router import Router
from proxy.verdict import fails_backend
from simulator.cluster import Cluster
from tests.conftest import chat, config_document


async def test_backend_goes_down_after_fall_and_up_after_rise(cluster: Cluster) -> None:
    router = Router(parse_config(cluster))
    checker = ActiveHealthChecker(
        [router.models["hermes-2"]],
        HealthCheckConfig(interval=60, timeout=0.5, fall=3, rise=2),
        random.Random(0),
        probe_failed=fails_backend,
    )
    checker.start()  # the loops wait up to one interval first; the test probes by hand
    try:
        probe = checker.probes["hermes-2"]
        upstream = probe.upstream
        assert await checker.check(probe)
        assert upstream.last_check is not None and upstream.last_response_ms is not None
        cluster["hermes-2"].behaviour.status = 503
        for expected in (True, True, False):
            assert not await checker.check(probe)
            assert upstream.healthy is expected
        cluster["hermes-2"].behaviour.status = 200
        assert await checker.check(probe)
        assert not upstream.healthy
        assert await checker.check(probe)
        assert upstream.healthy
    finally:
        await checker.stop()


async def test_unhealthy_backend_gets_no_traffic(cluster: Cluster, start_gateway, http) -> None:
    gateway = await start_gateway(config_document(cluster))
    next(u for u in gateway.router.upstreams if u.name == "mixtral-8x7b").healthy = False
    gateway.router.refresh_health()  # what the checker does when a verdict changes
    seen = set()
    for _ in range(6):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
            seen.add(response.headers["x-router-backend"])
    assert seen == {"hermes-2", "openchat-3.5", "phi-3-mini"}
    assert cluster["mixtral-8x7b"].behaviour.requests == 0
    assert not gateway.router.auto.failing_open


async def test_whole_pool_unhealthy_fails_open(cluster: Cluster, start_gateway, http) -> None:
    gateway = await start_gateway(config_document(cluster))
    for upstream in gateway.router.qdrant.upstreams:
        upstream.healthy = False
    gateway.router.refresh_health()
    assert gateway.router.qdrant.failing_open
    body = {"query_vector": [0.5], "collection": "documents"}
    async with http.post(f"{gateway.url}/api/v1/vectors/search", json=body) as response:
        assert response.status == 200  # tried anyway rather than refusing everything
    # A model whose only backend is unhealthy fails open when named, but `auto` avoids it.
    mixtral = gateway.router.models["mixtral-8x7b"].upstreams[0]
    mixtral.healthy = False
    gateway.router.refresh_health()
    assert gateway.router.models["mixtral-8x7b"].failing_open
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("mixtral-8x7b")) as r:
        assert r.status == 200
    for _ in range(4):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("auto")) as r:
            assert r.headers["x-router-backend"] != "mixtral-8x7b"


def parse_config(cluster: Cluster) -> Config:
    return parse(config_document(cluster), {})
