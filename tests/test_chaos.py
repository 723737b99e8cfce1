"""Chaos endpoints drive the real breaker and failover paths and report measured figures."""

from __future__ import annotations

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document


async def test_chaos_endpoints_are_off_by_default(gateway, http) -> None:
    async with http.post(
        f"{gateway.url}/api/v1/router/circuit-breaker/test", json={"backend": "hermes-2"}
    ) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "chaos_disabled"
    assert gateway.router.models["hermes-2"].upstreams[0].breaker.failure_count == 0


async def test_circuit_breaker_test_trips_the_real_breaker(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, chaos={"enabled": True}))
    url = f"{gateway.url}/api/v1/router/circuit-breaker/test"
    async with http.post(url, json={"backend": "hermes-2", "simulate_failure": True}) as r:
        assert r.status == 200
        result = (await r.json())["circuit_breaker_test"]
    assert result["backend"] == "hermes-2" and result["initial_state"] == "closed"
    assert result["failure_threshold"] == 5 and result["simulated_failures"] == 5
    assert result["circuit_breaker_triggered"] is True and result["new_state"] == "open"
    assert result["failover_activated"] is True and result["backup_backend"] != "hermes-2"
    assert result["recovery_time_ms"] == 60000 and result["test_duration_ms"] >= 0
    for _ in range(8):  # live traffic now avoids it
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200 and r.headers["x-router-backend"] != "hermes-2"
    async with http.post(url, json={"backend": "hermes-2", "simulate_failure": False}) as r:
        assert (await r.json())["circuit_breaker_test"]["new_state"] == "closed"
    async with http.post(url, json={"backend": "nope"}) as r:
        assert r.status == 404


async def test_failover_test_measures_a_real_burst(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, chaos={"enabled": True}))
    async with http.post(
        f"{gateway.url}/api/v1/router/failover/test",
        json={"primary_backend": "mixtral-8x7b", "simulate_failure": True, "requests": 20},
    ) as response:
        assert response.status == 200
        result = (await response.json())["failover_test"]
    assert result["primary_backend"] == "mixtral-8x7b"
    assert result["failover_triggered"] is True and result["failover_time_ms"] > 0
    assert result["backup_backend"] in {"hermes-2", "openchat-3.5", "phi-3-mini"}
    assert result["requests_during_failover"] == 20 and result["requests_lost"] == 0
    assert result["recovery_successful"] is True and result["total_downtime_ms"] == 0
    assert cluster["mixtral-8x7b"].behaviour.requests <= 1  # only the recovery probe, maybe
    breaker = gateway.router.models["mixtral-8x7b"].upstreams[0].breaker
    assert breaker.state.value == "closed"


async def test_circuit_breaker_test_accepts_a_pool_name(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """The specification's example: {"backend": "qdrant"} trips the pool's first backend and
    names the one that takes over."""
    gateway = await start_gateway(config_document(cluster, chaos={"enabled": True}))
    url = f"{gateway.url}/api/v1/router/circuit-breaker/test"
    async with http.post(url, json={"backend": "qdrant", "simulate_failure": True}) as r:
        assert r.status == 200
        result = (await r.json())["circuit_breaker_test"]
    assert result["backend"] == "qdrant" and result["target_backend"] == "qdrant-primary"
    assert result["new_state"] == "open" and result["circuit_breaker_triggered"] is True
    assert result["failover_activated"] is True
    assert result["backup_backend"] == "qdrant-secondary"
    search = {"query_vector": [0.1], "collection": "documents"}
    for _ in range(3):
        async with http.post(f"{gateway.url}/api/v1/vectors/search", json=search) as r:
            assert r.status == 200 and r.headers["x-router-backend"] == "qdrant-secondary"
    async with http.post(url, json={"backend": "qdrant", "simulate_failure": False}) as r:
        result = (await r.json())["circuit_breaker_test"]
    assert result["target_backend"] == "qdrant-primary" and result["new_state"] == "closed"
    async with http.post(url, json={"backend": "nope"}) as r:
        assert r.status == 404
        assert "pools: auto" in (await r.json())["error"]["message"]


async def test_failover_test_failovers_are_the_metrics_failovers(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """One failover, counted once: what the test reports is what failover_events, the state
    counters and Prometheus count."""
    gateway = await start_gateway(config_document(cluster, chaos={"enabled": True}))
    async with http.post(
        f"{gateway.url}/api/v1/router/failover/test",
        json={"primary_backend": "qdrant", "simulate_failure": True, "requests": 20},
    ) as response:
        assert response.status == 200
        result = (await response.json())["failover_test"]
    assert result["primary_backend"] == "qdrant-primary"
    assert result["failure_simulation"] == "backend_unreachable"
    assert result["failover_triggered"] is True and result["failovers"] >= 1
    assert result["backup_backend"] == "qdrant-secondary" and result["requests_lost"] == 0
    assert result["recovery_successful"] is True
    assert cluster["qdrant-primary"].behaviour.requests <= 1  # the recovery probe, maybe
    metrics = await get_json(http, f"{gateway.url}/api/v1/router/metrics")
    events = metrics["failover_events"]
    assert events["total_failovers"] == result["failovers"]
    assert events["successful_failovers"] == result["failovers"]
    assert metrics["counters"]["failovers"] == result["failovers"]
    state = await get_json(http, f"{gateway.url}/api/v1/router/state")
    assert state["counters"]["failovers"] == result["failovers"]
    async with http.get(f"{gateway.url}/metrics") as response:
        assert f"router_failovers_total {float(result['failovers'])}" in await response.text()
    breaker = gateway.router.qdrant.upstreams[0].breaker
    assert breaker.state.value == "closed" and breaker.trips == 1  # opened by real failures


async def get_json(http, url: str) -> dict:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()
