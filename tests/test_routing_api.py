"""The routing decision API: the specified shapes, and agreement with real routing."""

from __future__ import annotations

from proxy.verdict import BACKEND_FAILED
from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document


async def decide(http, url: str, body: dict) -> dict:
    async with http.post(f"{url}/routing/decide", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_decide_returns_the_specified_shape(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"strategy": "cost_optimized"}))
    result = await decide(
        http,
        gateway.url,
        {"request_type": "chat_completion", "content": "Hello world", "budget": 0.05},
    )
    assert set(result) == {"request_id", "model_selection", "load_balancing", "circuit_breaker"}
    selection = result["model_selection"]
    assert selection["selected_model"] == "phi-3-mini"
    assert selection["cost_estimate"] == 0.0004 and 0 < selection["confidence_score"] <= 1
    assert "cheapest" in selection["reasoning"]
    balancing = result["load_balancing"]
    assert balancing["target_instance"] == "phi-3-mini"
    assert balancing["load_factor"] == 0 and balancing["health_status"] == "healthy"
    assert result["circuit_breaker"] == {
        "status": "closed",
        "failure_count": 0,
        "last_failure_time": None,
    }
    assert sum(b.behaviour.requests for b in cluster.backends.values()) == 0  # nothing sent


async def test_decide_agrees_with_where_a_real_request_goes(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"strategy": "specialization"}))
    for content in ("Write a SQL query for monthly revenue", "Good morning!", "2+2?"):
        decision = await decide(http, gateway.url, {"content": content})
        async with http.post(
            f"{gateway.url}/v1/chat/completions", json=chat("auto", content=content)
        ) as response:
            actual = response.headers["x-router-backend"]
        assert decision["load_balancing"]["target_instance"] == actual, content
    coding = await decide(http, gateway.url, {"content": "fix this python bug"})
    assert coding["model_selection"]["selected_model"] == "mixtral-8x7b"
    assert "classified as coding" in coding["model_selection"]["reasoning"]


async def test_decide_refuses_what_nothing_satisfies(gateway, http) -> None:
    async with http.post(
        f"{gateway.url}/routing/decide", json={"content": "hi", "budget": 0.00001}
    ) as response:
        assert response.status == 422
        assert "max_cost" in (await response.json())["error"]["message"]


async def test_routing_test_status_load_breakers_and_performance(gateway, http) -> None:
    scenarios = [
        {"type": "chat_completion", "content": "Hello", "budget": 0.01},
        {"type": "coding", "content": "def f(): pass", "budget": 0.005},
    ]
    async with http.post(
        f"{gateway.url}/routing/test", json={"test_scenarios": scenarios}
    ) as response:
        results = (await response.json())["results"]
    assert [r["scenario"] for r in results] == scenarios
    assert all(r["model_selection"]["selected_model"] for r in results)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200

    async with http.get(f"{gateway.url}/routing/status") as response:
        status = await response.json()
    assert (
        status["strategy"] == "round_robin" and "specialization" in status["available_strategies"]
    )
    assert status["budget"]["spent"] == 0.0018 and status["budget"]["exhausted"] is False
    async with http.get(f"{gateway.url}/routing/load") as response:
        load = (await response.json())["models"]
    assert load["hermes-2"]["requests"] == 1 and load["hermes-2"]["capacity"] == 20
    async with http.get(f"{gateway.url}/routing/circuit-breaker/status") as response:
        breakers = (await response.json())["circuit_breakers"]
    assert breakers["phi-3-mini"]["status"] == "closed"
    async with http.get(f"{gateway.url}/routing/performance") as response:
        performance = await response.json()
    assert performance["decisions"] >= 3
    assert performance["decisions_per_strategy"]["round_robin"] >= 3
    assert 0 < performance["decision_time_us"]["p50"] < 1000
    assert set(performance["cache"]) == {"hits", "misses", "hit_rate"}


async def test_breaker_status_dates_failures_on_the_wall_clock(gateway, http) -> None:
    gateway.router.models["hermes-2"].upstreams[0].record(BACKEND_FAILED)
    async with http.get(f"{gateway.url}/routing/circuit-breaker/status") as response:
        breakers = (await response.json())["circuit_breakers"]
    hermes = breakers["hermes-2"]
    assert hermes["status"] == "closed" and hermes["failure_count"] == 1
    assert hermes["last_failure_time"].endswith("Z")  # ISO-8601, not a monotonic float
    assert breakers["phi-3-mini"]["last_failure_time"] is None
