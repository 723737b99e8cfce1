"""The structured access log and the admin audit trail."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import orjson

from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document


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


async def test_backend_failures_and_breaker_transitions_are_logged(
    cluster: Cluster, start_gateway: StartGateway, http, caplog
) -> None:
    """As nginx logs "upstream failed" and HAProxy "server DOWN": one error line per backend
    failure, and one per breaker transition, naming the backend."""
    clock = ManualClock()
    document = config_document(
        cluster, circuit_breaker={"threshold": 2, "timeout": 10}, retry={"max_retries": 0}
    )
    gateway = await start_gateway(document, clock=clock)
    cluster["hermes-2"].behaviour.status = 503
    caplog.set_level(logging.WARNING, logger="request_router")
    for _ in range(2):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 503
    failures = [r for r in caplog.records if "failed:" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelno == logging.ERROR for r in failures)
    assert failures[0].getMessage().startswith("backend hermes-2 failed: answered 503")
    assert "/v1/chat/completions" in failures[0].getMessage()
    opened = [r.getMessage() for r in caplog.records if "circuit open" in r.getMessage()]
    assert opened == ["backend hermes-2: circuit open for 10s after 2 failures"]
    cluster["hermes-2"].behaviour.status = 200
    clock.advance(10)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
    messages = [r.getMessage() for r in caplog.records]
    assert "backend hermes-2: circuit half-open, letting trial requests through" in messages
    assert messages[-1] == "backend hermes-2: circuit closed, serving again"


async def test_access_log_carries_client_method_error_code_queue_wait_bytes_and_backend(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    """What an nginx or HAProxy operator reads in an access line: who asked (peer, and a
    proxy's X-Forwarded-For as received), how, what they got (status, the gateway's error
    code, the verdict), how long they queued, how many bytes went each way, which backend."""
    path = tmp_path / "access.jsonl"
    document = config_document(cluster, logging={"access_log": str(path)})
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    gateway = await start_gateway(document)
    cluster["mixtral-8x7b"].behaviour.latency = 0.2
    url = f"{gateway.url}/v1/chat/completions"

    async def post(body: dict, request_id: str, **headers: str) -> tuple[int, bytes]:
        headers = {"X-Request-ID": request_id, "Content-Type": "application/json", **headers}
        async with http.post(url, data=orjson.dumps(body), headers=headers) as r:
            return r.status, await r.read()

    sent = orjson.dumps(chat("mixtral-8x7b"))
    first, second = await asyncio.gather(
        post(chat("mixtral-8x7b"), "queued-1", **{"X-Forwarded-For": "203.0.113.7"}),
        post(chat("mixtral-8x7b"), "queued-2"),
    )
    assert first[0] == second[0] == 200
    cluster["openchat-3.5"].behaviour.token_delay = 0.005
    status, streamed = await post(chat("openchat-3.5", stream=True), "stream")
    assert status == 200
    for upstream in gateway.router.models["hermes-2"].upstreams:
        upstream.breaker.force_open()
    status, refusal = await post(chat("hermes-2"), "refused")
    assert status == 503
    await asyncio.sleep(0.7)  # written in batches every half second
    lines = {line["request_id"]: line for line in map(orjson.loads, path.read_bytes().split())}
    queued = [lines["queued-1"], lines["queued-2"]]
    for line in queued:
        assert line["client"] == "127.0.0.1" and line["method"] == "POST"
        assert line["status"] == 200 and line["error_code"] is None and line["verdict"] == "ok"
        assert line["backend"] == "mixtral-8x7b"
        assert line["bytes_received"] == len(sent)
        assert line["bytes_sent"] > len(first[1])  # the body, and the status line and headers
    assert lines["queued-1"]["forwarded_for"] == "203.0.113.7"
    assert lines["queued-2"]["forwarded_for"] is None
    # One slot: whichever went second waited for the first (its 0.2 s answer) in the queue.
    assert max(line["queue_wait_ms"] for line in queued) >= 150
    assert min(line["queue_wait_ms"] for line in queued) < 50
    stream = lines["stream"]
    assert stream["stream"] is True and stream["backend"] == "openchat-3.5"
    assert stream["bytes_sent"] > len(streamed)  # chunked framing and headers on top
    refused = lines["refused"]
    assert refused["status"] == 503 and refused["error_code"] == "no_backend_available"
    assert refused["verdict"] == "gateway_refused" and refused["backend"] is None
    assert refused["bytes_sent"] > len(refusal) > 0
