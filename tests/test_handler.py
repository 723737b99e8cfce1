"""The request path end to end: real gateway, real simulated backends, real sockets."""

from __future__ import annotations

import asyncio
import gc
import gzip
import tracemalloc
from collections import Counter

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.jsonbody import json_bytes
from simulator.cluster import Cluster
from tests.conftest import MODELS, RunningGateway, StartGateway, chat, config_document


async def post_chat(http: aiohttp.ClientSession, gateway: RunningGateway, body: dict) -> str:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        data = await response.json()
        backend = response.headers["x-router-backend"]
        assert data["model"] == backend  # the simulator answers with its own model name
        return backend


async def test_round_robin_over_four_models_is_exactly_even(gateway, http) -> None:
    counts = Counter([await post_chat(http, gateway, chat("auto")) for _ in range(100)])
    assert counts == {name: 25 for name in MODELS}


async def test_missing_model_is_balanced_and_forwarded_with_the_chosen_name(
    gateway, http, cluster: Cluster
) -> None:
    seen = [await post_chat(http, gateway, chat(model=None)) for _ in range(4)]
    assert sorted(seen) == sorted(MODELS)
    forwarded = orjson.loads(cluster["phi-3-mini"].behaviour.last_body)
    assert forwarded["model"] == "phi-3-mini"
    assert forwarded["messages"] == [{"role": "user", "content": "Hello"}]


async def test_weighted_follows_weights_exactly_over_each_cycle(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"strategy": "weighted"}))
    # 1.0 : 0.8 : 0.6 : 0.4 is 5 : 4 : 3 : 2, a cycle of 14 picks.
    for _cycle in range(2):
        counts = Counter([await post_chat(http, gateway, chat("auto")) for _ in range(14)])
        assert counts == {"mixtral-8x7b": 5, "hermes-2": 4, "openchat-3.5": 3, "phi-3-mini": 2}


async def test_named_model_goes_to_its_pool_and_body_is_forwarded_unchanged(
    gateway, http, cluster: Cluster
) -> None:
    raw = b'{"model":"hermes-2",  "messages":[{"role":"user","content":"x"}], "extra": 1}'
    async with http.post(
        f"{gateway.url}/v1/chat/completions",
        data=raw,
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 200
        assert response.headers["x-router-backend"] == "hermes-2"
    assert cluster["hermes-2"].behaviour.last_body == raw


async def test_least_connections_steers_away_from_backend_holding_slow_requests(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster, routing={"strategy": "least_connections"})
    )
    cluster["mixtral-8x7b"].behaviour.latency = 1.0
    slow = [asyncio.create_task(post_chat(http, gateway, chat("mixtral-8x7b"))) for _ in range(3)]
    await asyncio.sleep(0.2)  # the three slow requests are now in flight on mixtral
    counts = Counter([await post_chat(http, gateway, chat("auto")) for _ in range(30)])
    assert "mixtral-8x7b" not in counts
    assert sum(counts.values()) == 30
    assert await asyncio.gather(*slow) == ["mixtral-8x7b"] * 3


async def test_strategy_swap_under_concurrent_load_drops_nothing(gateway, http) -> None:
    async def client(n: int) -> list[int]:
        statuses = []
        for _ in range(n):
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
                await r.read()
                statuses.append(r.status)
        return statuses

    async def swapper() -> None:
        for strategy in [
            "least_connections",
            "weighted",
            "random",
            "power_of_two",
            "round_robin",
        ] * 2:
            async with http.put(
                f"{gateway.url}/api/v1/router/strategy", json={"strategy": strategy}
            ) as r:
                assert r.status == 200
            await asyncio.sleep(0.01)

    results = await asyncio.gather(*(client(20) for _ in range(10)), swapper())
    statuses = [s for batch in results[:-1] for s in batch]
    assert statuses == [200] * 200
    assert all(u.active == 0 for u in gateway.router.upstreams)


async def test_unknown_model_is_404_and_never_forwarded(gateway, http, cluster: Cluster) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("gpt-17")) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["code"] == "model_not_found"
    assert "gpt-17" in error["message"] and error["type"] == "invalid_request_error"
    assert sum(b.behaviour.requests for b in cluster.backends.values()) == 0


async def test_malformed_json_is_400_naming_the_problem(gateway, http) -> None:
    for body in (b'{"model": "auto", ', b"[1, 2]", b""):
        async with http.post(f"{gateway.url}/v1/chat/completions", data=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["code"] == "invalid_json"
            assert "JSON" in error["message"]


async def test_wrong_field_types_are_400(gateway, http) -> None:
    for body, field in (({"model": 7}, "model"), ({"model": "auto", "stream": "yes"}, "stream")):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
            assert response.status == 400
            assert field in (await response.json())["error"]["message"]


async def test_body_over_limit_is_413(cluster: Cluster, start_gateway: StartGateway, http) -> None:
    gateway = await start_gateway(config_document(cluster, server={"max_body_bytes": 1024}))
    body = chat(content="x" * 4096)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
        assert response.status == 413
        error = (await response.json())["error"]
        assert error["code"] == "payload_too_large" and "1024" in error["message"]


async def test_unknown_route_and_wrong_method_get_json_errors(gateway, http) -> None:
    async with http.get(f"{gateway.url}/v2/nothing") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    async with http.get(f"{gateway.url}/v1/chat/completions") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_dispatched_and_application_routed_requests_are_answered_alike(
    gateway, http
) -> None:
    """proxy.server.DataPlane serves a data route's exact path; a query string or an escaped
    character sends the same request through the Application's router instead."""
    for path in ("/v1/chat/completions", "/v1/chat/completions?x=1", "/v1/chat/%63ompletions"):
        url = URL(gateway.url + path, encoded=True)
        async with http.post(url, json=chat("hermes-2")) as response:
            assert response.status == 200, path
            assert response.headers["x-router-backend"] == "hermes-2"
        async with http.post(url, data=b"{", headers={"X-Request-ID": "r-1"}) as response:
            assert response.status == 400, path
            assert (await response.json())["error"]["code"] == "invalid_json"
            assert response.headers["x-router-attempts"] == "0"
            assert response.headers["x-request-id"] == "r-1"
            assert float(response.headers["x-router-overhead-ms"]) >= 0


async def test_unreachable_backend_fails_over_to_another(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    await cluster["mixtral-8x7b"].runner.cleanup()  # its port is now closed
    gateway = await start_gateway(config_document(cluster))
    counts = Counter([await post_chat(http, gateway, chat("auto")) for _ in range(8)])
    assert "mixtral-8x7b" not in counts and sum(counts.values()) == 8
    dead = next(u for u in gateway.router.upstreams if u.name == "mixtral-8x7b")
    assert dead.failures >= 1


async def test_unreachable_pool_is_502_with_json_body(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    await cluster["hermes-2"].runner.cleanup()
    gateway = await start_gateway(config_document(cluster))
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as response:
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["code"] == "backend_unreachable" and "hermes-2" in error["message"]


async def test_slow_backend_is_504(cluster: Cluster, start_gateway: StartGateway, http) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"request_timeout": 0.2}))
    cluster["phi-3-mini"].behaviour.latency = 1.0
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini")) as r:
        assert r.status == 504
        assert "phi-3-mini" in (await r.json())["error"]["message"]


async def test_backend_errors_pass_through_with_their_status(
    gateway, http, cluster: Cluster
) -> None:
    cluster["openchat-3.5"].behaviour.status = 429
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("openchat-3.5")) as r:
        assert r.status == 429
        assert r.headers["x-router-backend"] == "openchat-3.5"
        assert "simulated failure" in (await r.json())["error"]["message"]


async def test_forwarding_headers(gateway, http, cluster: Cluster) -> None:
    headers = {
        "X-Request-ID": "req-abc-123",
        "X-Forwarded-For": "198.51.100.7",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must not pass",
        "Authorization": "Bearer sk-client",
        "User-Agent": "test-client/1.0",
    }
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hermes-2"), headers=headers
    ) as response:
        assert response.headers["x-request-id"] == "req-abc-123"
        assert response.headers["x-router-backend"] == "hermes-2"
    seen = {k.lower(): v for k, v in cluster["hermes-2"].behaviour.last_headers.items()}
    assert seen["x-request-id"] == "req-abc-123"
    # The peer is no trusted proxy: the client's own X-Forwarded-For is replaced (issue 11).
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["authorization"] == "Bearer sk-client"
    assert "x-secret-hop" not in seen
    assert seen["user-agent"] == "test-client/1.0"


async def test_request_id_is_generated_when_absent(gateway, http, cluster: Cluster) -> None:
    ids = set()
    for _ in range(3):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
            ids.add(response.headers["x-request-id"])
    assert len(ids) == 3


async def test_models_list_in_openai_format(gateway, http) -> None:
    async with http.get(f"{gateway.url}/v1/models") as response:
        data = await response.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == list(MODELS)
    assert all(m["object"] == "model" for m in data["data"])


async def test_text_completions_route(gateway, http) -> None:
    body = {"model": "phi-3-mini", "prompt": "Once upon a time"}
    async with http.post(f"{gateway.url}/v1/completions", json=body) as response:
        data = await response.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"].startswith("[phi-3-mini]")


async def test_an_idle_client_connection_does_not_hold_its_last_response_body(
    gateway, cluster: Cluster, http
) -> None:
    """aiohttp keeps a connection's last response object until the next request on it."""
    cluster["hermes-2"].behaviour.update({"tokens": 100, "token_bytes": 8000})
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
        assert len(await r.read()) > 700_000
    gc.collect()  # the client connection stays open and idle in `http`'s pool
    held = [
        o
        for o in gc.get_objects()
        if isinstance(o, web.Response)
        and "x-router-backend" in o.headers
        and o.body is not None
        and len(o.body) > 700_000
    ]
    assert held == []


def test_json_bodies_take_only_their_own_size() -> None:
    """orjson's output keeps 4 KiB of slack; bodies an idle connection keeps must not."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        bodies = [json_bytes({"status": "alive", "pid": pid}) for pid in range(100)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    allocated = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert allocated / len(bodies) < 256
    assert orjson.loads(bodies[7]) == {"status": "alive", "pid": 7}


async def test_a_body_that_cannot_be_rewritten_is_refused_and_gives_its_slot_back(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """orjson reads JSON 1024 levels deep but writes only 254: a "model": "auto" body nested
    300 deep is accepted, then fails when the chosen model is written into it. That happens
    with a backend slot held; it must come back (here, two slots and five such requests)."""
    gateway = await start_gateway(
        config_document(cluster, routing={"max_concurrent_requests": 2}, queue={"timeout": 1})
    )
    deep = {**chat("auto"), "extra": orjson.loads(b"[" * 300 + b"]" * 300)}
    url = f"{gateway.url}/v1/chat/completions"
    for _ in range(5):
        async with http.post(url, json=deep) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"
    async with http.post(url, json=chat("auto")) as response:
        assert response.status == 200
    assert gateway.runtime.admission.in_flight == 0


async def test_a_fallback_body_that_cannot_be_rewritten_is_refused_and_gives_its_slot_back(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """The same body asking for mixtral-8x7b by name is forwarded byte for byte; only when
    mixtral is down and hermes-2 must serve it does it need rewriting, and fails then."""
    gateway = await start_gateway(
        config_document(
            cluster,
            routing={"max_concurrent_requests": 2},
            fallbacks={"mixtral-8x7b": ["hermes-2"]},
        )
    )
    deep = {**chat("mixtral-8x7b"), "extra": orjson.loads(b"[" * 300 + b"]" * 300)}
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=deep) as response:
        assert response.status == 200  # forwarded as sent
    cluster["mixtral-8x7b"].behaviour.drop = True
    for _ in range(5):
        async with http.post(url, json=deep) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"
    async with http.post(url, json=chat("mixtral-8x7b")) as response:
        assert response.status == 200 and response.headers["x-router-fallback"] == "hermes-2"
    assert gateway.runtime.admission.in_flight == 0


async def test_a_gzip_body_is_forwarded_decoded_and_without_its_coding(
    gateway, http, cluster: Cluster
) -> None:
    """aiohttp decodes the body; forwarding it still labelled gzip made the backend fail, and
    five such requests opened its breaker for everybody (issue 11, item 3)."""
    body = json_bytes(chat("hermes-2"))
    url = f"{gateway.url}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    for _ in range(6):
        async with http.post(url, data=gzip.compress(body), headers=headers) as response:
            assert response.status == 200
    behaviour = cluster["hermes-2"].behaviour
    assert behaviour.last_body == body
    assert "Content-Encoding" not in behaviour.last_headers
    assert gateway.router.models["hermes-2"].upstreams[0].breaker.failure_count == 0


async def test_forwarded_for_is_kept_only_from_a_trusted_proxy(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster, server={"trusted_proxies": ["127.0.0.0/8"]})
    )
    headers = {"X-Forwarded-For": "198.51.100.7"}
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat("hermes-2"), headers=headers) as response:
        assert response.status == 200
    seen = {k.lower(): v for k, v in cluster["hermes-2"].behaviour.last_headers.items()}
    assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"


async def test_headers_with_underscores_are_not_forwarded(gateway, http, cluster: Cluster) -> None:
    headers = {"X_Api_Key": "spoofed", "X-Api-Key": "real"}
    url = f"{gateway.url}/v1/chat/completions"
    async with http.post(url, json=chat("hermes-2"), headers=headers) as response:
        assert response.status == 200
    seen = {k.lower(): v for k, v in cluster["hermes-2"].behaviour.last_headers.items()}
    assert seen["x-api-key"] == "real" and "x_api_key" not in seen


async def test_a_routing_key_given_twice_is_refused(gateway, http, cluster: Cluster) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    twice = b'{"model": "hermes-2", "messages": [], "model": "phi-3-mini"}'
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=twice, headers=headers) as response:
        assert response.status == 400
        body = await response.json()
        assert body["error"]["code"] == "duplicate_key" and "'model'" in body["error"]["message"]
    nested = b'{"model": "hermes-2", "messages": [], "tools": [{"model": "x"}]}'
    async with http.post(url, data=nested, headers=headers) as response:
        assert response.status == 200  # a nested key of the same name is the backend's business
    assert cluster["hermes-2"].behaviour.requests == 1


async def test_a_transfer_coding_other_than_chunked_is_refused(gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = gzip.compress(json_bytes(chat("hermes-2")))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n" % len(payload)
        + payload
        + b"\r\n0\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 501")


async def test_what_the_openai_sdk_reads_before_retrying_on_its_own(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Once the gateway's retries are spent, a backend failure says x-should-retry: false (the
    SDK would retry it twice more); every Retry-After comes with retry-after-ms (issue 12)."""
    gateway = await start_gateway(
        config_document(cluster, load_shedding={"max_pending": 1}, retry={"max_retries": 1})
    )
    url = f"{gateway.url}/v1/chat/completions"
    phi = cluster["phi-3-mini"].behaviour
    phi.status, phi.retry_after = 503, 2
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 503  # the backend's own answer, after the retry
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["retry-after-ms"] == "2000"
    phi.status, phi.retry_after, phi.drop = 200, None, True
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 502 and response.headers["x-should-retry"] == "false"
    phi.drop = False
    phi.status, phi.retry_after = 429, 3
    async with http.post(url, json=chat("phi-3-mini")) as response:
        assert response.status == 429  # a pause, not a failure: the SDK may come back
        assert "x-should-retry" not in response.headers
        assert response.headers["retry-after-ms"] == "3000"
    cluster["openchat-3.5"].behaviour.latency = 0.3
    slow = asyncio.ensure_future(http.post(url, json=chat("openchat-3.5")))
    await asyncio.sleep(0.1)  # one request in flight: max_pending reached
    async with http.post(url, json=chat("hermes-2")) as response:
        assert response.status == 503 and (await response.json())["error"]["code"] == "load_shed"
        seconds = int(response.headers["Retry-After"])
        assert response.headers["retry-after-ms"] == str(seconds * 1000)
        assert "x-should-retry" not in response.headers
    (await slow).release()
