"""Per-endpoint upstream settings (issue 12): the name a backend serves its model under, extra
headers (an API key for a hosted OpenAI-compatible backend), and HAProxy-style backups."""

from __future__ import annotations

import orjson
import pytest

from config.reader import ConfigError
from config.schema import parse
from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document


async def test_a_backend_serving_the_model_under_another_name_gets_that_name(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    document = config_document(cluster)
    endpoint = document["models"]["hermes-2"]["endpoints"][0]
    endpoint["served_model_name"] = "NousResearch/Hermes-2-Pro"
    gateway = await start_gateway(document)
    backend = cluster["hermes-2"].behaviour
    url = f"{gateway.url}/v1/chat/completions"
    body = {**chat("hermes-2"), "temperature": 0.2}
    async with http.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["x-router-backend"] == "hermes-2"
    forwarded = orjson.loads(backend.last_body)
    assert forwarded == {**body, "model": "NousResearch/Hermes-2-Pro"}
    # "auto" choosing it gets the served name too; other backends are forwarded as sent.
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 200
    assert orjson.loads(cluster["phi-3-mini"].behaviour.last_body)["model"] == "phi-3-mini"


async def test_an_endpoints_headers_replace_the_clients(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    document = config_document(cluster)
    endpoint = document["models"]["hermes-2"]["endpoints"][0]
    endpoint["headers"] = {"Authorization": "Bearer backend-key", "OpenAI-Organization": "org-1"}
    gateway = await start_gateway(document)
    client = {"Authorization": "Bearer client-key", "X-Trace": "t1"}
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hermes-2"), headers=client
    ) as response:
        assert response.status == 200
    seen = cluster["hermes-2"].behaviour.last_headers
    assert seen["Authorization"] == "Bearer backend-key"  # one, the endpoint's
    assert seen["OpenAI-Organization"] == "org-1" and seen["X-Trace"] == "t1"
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini"), headers=client
    ) as response:
        assert response.status == 200
    assert cluster["phi-3-mini"].behaviour.last_headers["Authorization"] == "Bearer client-key"


def test_endpoint_headers_are_checked_when_the_config_is_read(cluster: Cluster) -> None:
    for headers, problem in (
        ({"Content-Length": "1"}, "set by the gateway itself"),
        ({"X_Key": "1"}, "not a header name"),
        ({"X-Key": "a\r\nEvil: 1"}, "line break"),
    ):
        document = config_document(cluster)
        document["models"]["hermes-2"]["endpoints"][0]["headers"] = headers
        with pytest.raises(ConfigError, match=problem):
            parse(document, {})


async def test_a_backup_endpoint_serves_only_while_no_other_is_live(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    document = config_document(cluster, circuit_breaker={"threshold": 1, "timeout": 60})
    document["models"]["hermes-2"]["endpoints"] = [
        {"name": "hermes-main", "url": cluster["hermes-2"].url},
        {"name": "hermes-backup", "url": cluster["openchat-3.5"].url, "backup": True},
    ]
    clock = ManualClock()
    gateway = await start_gateway(document, clock=clock)
    url = f"{gateway.url}/v1/chat/completions"

    async def served_by() -> str:
        async with http.post(url, json=chat("hermes-2")) as response:
            assert response.status == 200
            return response.headers["x-router-backend"]

    assert {await served_by() for _ in range(6)} == {"hermes-main"}
    cluster["hermes-2"].behaviour.fail_next = 1  # its breaker opens; the retry goes to backup
    assert await served_by() == "hermes-backup"
    assert {await served_by() for _ in range(4)} == {"hermes-backup"}
    clock.advance(60)  # its breaker lets a trial through, which succeeds: main serves again
    assert {await served_by() for _ in range(4)} == {"hermes-main"}
