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
