"""The structured access log and the admin audit trail."""

from __future__ import annotations

import asyncio
import hashlib

import orjson

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document


async def test_audit_log_records_accepted_and_refused_changes(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    path = tmp_path / "audit.jsonl"
    gateway = await start_gateway(
        config_document(cluster, logging={"audit_log": str(path)}),
        environ={"ROUTER_ADMIN_TOKEN": "s3cret"},
    )
    url = f"{gateway.url}/api/v1/router/strategy"
    good = {"Authorization": "Bearer s3cret"}
    async with http.put(url, json={"strategy": "random"}, headers=good) as response:
        assert response.status == 200
    async with http.put(url, json={"strategy": "weighted"}) as response:
        assert response.status == 401
    async with http.put(url, json={"strategy": "telepathy"}, headers=good) as response:
        assert response.status == 400
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [(e["action"], e["accepted"]) for e in entries] == [
        ("strategy", True),
        ("strategy", False),
        ("strategy", False),
    ]
    accepted, unauthorized, invalid = entries
    fingerprint = "token:" + hashlib.sha256(b"s3cret").hexdigest()[:12]
    assert accepted["identity"] == fingerprint and accepted["peer"] == "127.0.0.1"
    assert accepted["old"] == "round_robin"
    assert accepted["new"] == {"strategy": "random", "pool": None}
    assert unauthorized["identity"] == "anonymous" and "Authorization" in unauthorized["reason"]
    assert invalid["new"]["strategy"] == "telepathy" and "telepathy" in invalid["reason"]
    assert all(e["time"].endswith("Z") for e in entries)
    assert "s3cret" not in path.read_text()


async def test_access_log_writes_one_json_line_per_request(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    path = tmp_path / "access.jsonl"
    gateway = await start_gateway(config_document(cluster, logging={"access_log": str(path)}))
    headers = {"X-Request-ID": "trace-1"}
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hermes-2"), headers=headers
    ) as r:
        assert r.status == 200
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini")) as r:
        assert r.status == 200
    await asyncio.sleep(0.7)  # written in batches every half second
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["backend"] for line in lines] == ["hermes-2", "phi-3-mini"]
    first = lines[0]
    assert first["request_id"] == "trace-1" and first["status"] == 200
    assert first["route"] == "/v1/chat/completions" and first["completion_tokens"] == 8
    assert first["duration_ms"] > 0 and first["time"].endswith("Z")
