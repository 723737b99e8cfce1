"""Admin API: strategy read and swap, its protection, and backend state."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request

from control.access import is_local_peer
from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document


async def test_get_strategy_lists_current_and_available(gateway, http) -> None:
    async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
        data = await response.json()
    assert data["strategy"] == "round_robin"
    assert set(data["available_strategies"]) >= {
        "round_robin",
        "weighted",
        "weighted_round_robin",
        "least_connections",
        "random",
        "power_of_two",
    }
    assert data["pools"]["hermes-2"] == "round_robin"


async def test_put_strategy_swaps_and_reports_the_change(gateway, http) -> None:
    async with http.put(
        f"{gateway.url}/api/v1/router/strategy", json={"strategy": "least_connections"}
    ) as response:
        assert response.status == 200
        change = (await response.json())["strategy_change"]
    assert change["previous_strategy"] == "round_robin"
    assert change["new_strategy"] == "least_connections"
    assert change["strategy_applied"] is True
    assert change["change_timestamp"].endswith("Z")
    assert set(change["active_connections_before"]) == {u.name for u in gateway.router.upstreams}
    assert change["active_connections_after"]["mixtral-8x7b"] == 0
    async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
        data = await response.json()
    assert data["strategy"] == "least_connections"
    assert set(data["pools"].values()) == {"least_connections"}


async def test_put_strategy_for_one_pool(gateway, http) -> None:
    async with http.put(
        f"{gateway.url}/api/v1/router/strategy", json={"strategy": "random", "pool": "qdrant"}
    ) as response:
        change = (await response.json())["strategy_change"]
    assert change["pool"] == "qdrant" and change["previous_strategy"] == "round_robin"
    assert gateway.router.qdrant.strategy == "random"
    assert gateway.router.strategy == "round_robin"
    assert gateway.router.auto.strategy == "round_robin"


async def test_unknown_strategy_is_400_listing_valid_ones_and_old_stays(gateway, http) -> None:
    async with http.put(
        f"{gateway.url}/api/v1/router/strategy", json={"strategy": "telepathy"}
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert "telepathy" in error["message"] and "least_connections" in error["message"]
    assert gateway.router.strategy == "round_robin"
    for body in ({"strategy": "random", "pool": "nope"}, {}):
        async with http.put(f"{gateway.url}/api/v1/router/strategy", json=body) as response:
            assert response.status == 400
    assert gateway.router.strategy == "round_robin"


async def test_admin_token_required_when_configured(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster), environ={"ROUTER_ADMIN_TOKEN": "t0k"})
    url = f"{gateway.url}/api/v1/router/strategy"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0k"}):
        async with http.put(url, json={"strategy": "random"}, headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"]["code"] == "unauthorized"
    assert gateway.router.strategy == "round_robin"
    async with http.put(
        url, json={"strategy": "random"}, headers={"Authorization": "Bearer t0k"}
    ) as response:
        assert response.status == 200
    assert gateway.router.strategy == "random"
    async with http.get(url) as response:  # reads stay open
        assert response.status == 200


def request_from(peer: str, headers: dict[str, str] | None = None):
    class Transport:
        def get_extra_info(self, name: str, default=None):
            return (peer, 40000) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    return make_mocked_request(
        "PUT", "/api/v1/router/strategy", headers=headers, transport=Transport()
    )


def test_a_local_peer_is_loopback_and_did_not_come_through_a_proxy() -> None:
    assert is_local_peer(request_from("127.0.0.1"))
    assert is_local_peer(request_from("::1"))
    for peer in ("203.0.113.9", "10.0.0.8"):
        assert not is_local_peer(request_from(peer))
    for header in ("X-Forwarded-For", "Forwarded"):  # a reverse proxy on this host
        assert not is_local_peer(request_from("127.0.0.1", {header: "for=203.0.113.9"}))


async def test_backends_and_health_report_state(gateway, http) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
    async with http.get(f"{gateway.url}/api/v1/router/backends") as response:
        pools = await response.json()
    hermes = pools["hermes-2"][0]
    assert hermes["requests"] == 1 and hermes["active"] == 0 and hermes["circuit"] == "closed"
    assert [b["name"] for b in pools["qdrant"]] == ["qdrant-primary", "qdrant-secondary"]
    async with http.get(f"{gateway.url}/health") as response:
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "healthy" and health["service"] == "request-router"
    assert health["models"] == ["mixtral-8x7b", "hermes-2", "openchat-3.5", "phi-3-mini"]
