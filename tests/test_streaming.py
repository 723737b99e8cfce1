"""SSE relayed as it arrives: pacing preserved, disconnects and broken upstreams handled."""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
import pytest

from circuit.breaker import BreakerState
from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document


async def test_first_chunk_arrives_long_before_the_last(gateway, http, cluster: Cluster) -> None:
    behaviour = cluster["hermes-2"].behaviour
    behaviour.tokens = 6
    behaviour.token_delay = 0.2  # the whole answer takes about a second
    started = time.monotonic()
    arrivals = []
    events = []
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hermes-2", stream=True)
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["x-router-backend"] == "hermes-2"
        async for line in response.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - started)
                events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    tokens = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert "".join(tokens).startswith("[hermes-2]Hello")
    assert arrivals[0] < 0.15
    assert arrivals[-1] - arrivals[0] > 0.8


async def test_client_disconnect_mid_stream_stops_the_upstream(
    gateway, http, cluster: Cluster
) -> None:
    behaviour = cluster["openchat-3.5"].behaviour
    behaviour.tokens = 50
    behaviour.token_delay = 0.05
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("openchat-3.5", stream=True)
    ) as response:
        await response.content.readline()
        assert behaviour.in_flight == 1
        response.close()  # the client goes away after the first event
    for _ in range(40):
        if behaviour.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert behaviour.in_flight == 0  # the simulator saw its connection dropped well before 2.5s
    assert gateway.runtime.stats.client_closed == 1  # recorded as a 499
    upstream = next(u for u in gateway.router.upstreams if u.name == "openchat-3.5")
    for _ in range(20):
        if upstream.active == 0:
            break
        await asyncio.sleep(0.05)
    assert upstream.active == 0


async def test_client_disconnect_before_first_byte_cancels_the_upstream(
    gateway, http, cluster: Cluster
) -> None:
    behaviour = cluster["phi-3-mini"].behaviour
    behaviour.latency = 3.0
    request = asyncio.create_task(
        http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini"))
    )
    await asyncio.sleep(0.3)
    assert behaviour.in_flight == 1
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    for _ in range(40):
        if behaviour.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert behaviour.in_flight == 0
    assert all(u.active == 0 for u in gateway.router.upstreams)
    assert gateway.runtime.stats.client_closed == 1


async def test_upstream_dying_mid_stream_ends_with_an_error_event_not_done(
    gateway, http, cluster: Cluster
) -> None:
    behaviour = cluster["mixtral-8x7b"].behaviour
    behaviour.tokens = 10
    behaviour.drop_after_chunks = 3
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("mixtral-8x7b", stream=True)
    ) as response:
        assert response.status == 200
        events = [line for line in (await response.text()).splitlines() if line]
    assert len(events) == 4 and "[DONE]" not in events[-1]
    error = orjson.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_disconnected" and "mixtral-8x7b" in error["message"]
    upstream = next(u for u in gateway.router.upstreams if u.name == "mixtral-8x7b")
    assert upstream.failures == 1 and upstream.active == 0


async def test_stall_mid_stream_ends_the_stream_and_closes_the_upstream(
    cluster: Cluster, start_gateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"idle_timeout": 0.3}))
    behaviour = cluster["hermes-2"].behaviour
    behaviour.tokens = 4
    behaviour.token_delay = 2.0
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hermes-2", stream=True)
    ) as response:
        events = [line for line in (await response.text()).splitlines() if line]
    assert len(events) == 2
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_stalled"
    await asyncio.sleep(0.1)
    assert behaviour.in_flight == 0  # the backend saw its connection closed
    assert gateway.router.models["hermes-2"].upstreams[0].breaker.failure_count == 1


async def test_openai_sdk_raises_on_a_broken_stream(gateway, cluster: Cluster) -> None:
    cluster["phi-3-mini"].behaviour.drop_after_chunks = 2
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="phi-3-mini", stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
        received = []
        with pytest.raises(openai.APIError, match="incomplete"):
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 2


async def test_stream_include_usage_final_chunk_passes_through(gateway, http) -> None:
    body = chat("phi-3-mini", stream=True) | {"stream_options": {"include_usage": True}}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
        text = await response.text()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    usage = orjson.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 8


async def test_slow_client_pauses_the_upstream_instead_of_buffering(
    gateway, http, cluster: Cluster
) -> None:
    behaviour = cluster["phi-3-mini"].behaviour
    behaviour.tokens = 2000
    behaviour.token_bytes = 32 * 1024  # a 64 MB stream, far more than socket buffers hold
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini", stream=True)
    ) as response:
        await response.content.readline()
        await asyncio.sleep(1.0)  # the client reads nothing for a second
        # Had the gateway buffered, the simulator would have written everything by now.
        assert behaviour.in_flight == 1
        total = 0
        async for chunk in response.content.iter_any():
            total += len(chunk)
    assert total > 2000 * 32 * 1024
    assert behaviour.in_flight == 0


async def test_a_half_open_breaker_does_not_close_on_a_trial_whose_stream_breaks_off(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Each exchange is recorded once, when its body has ended: a trial's 200 headers used to
    close a half-open breaker before its stream broke off, so a backend whose streams stall
    stayed in rotation (found by scripts/chaos.py)."""
    clock = ManualClock()
    gateway = await start_gateway(
        config_document(
            cluster, circuit_breaker={"threshold": 3, "timeout": 1, "half_open_limit": 1}
        ),
        clock=clock,
    )
    breaker = gateway.router.models["hermes-2"].upstreams[0].breaker
    behaviour = cluster["hermes-2"].behaviour
    behaviour.drop_after_chunks = 2
    url = f"{gateway.url}/v1/chat/completions"

    async def broken_stream() -> None:
        async with http.post(url, json=chat("hermes-2", stream=True)) as response:
            assert response.status == 200
            assert b"upstream_disconnected" in await response.read()

    for _ in range(3):
        await broken_stream()
    assert breaker.state is BreakerState.OPEN
    for _ in range(2):
        clock.advance(breaker.open_for)  # half-open: the next request is its trial
        assert breaker.state is BreakerState.HALF_OPEN
        await broken_stream()
        assert breaker.state is BreakerState.OPEN  # not closed by the trial's headers
    behaviour.drop_after_chunks = None
    clock.advance(breaker.open_for)
    async with http.post(url, json=chat("hermes-2", stream=True)) as response:
        assert b"[DONE]" in await response.read()
    assert breaker.state is BreakerState.CLOSED  # a trial whose stream completes closes it


async def test_an_http_1_0_client_gets_the_stream_unframed_until_close(
    gateway, cluster: Cluster
) -> None:
    """HTTP/1.0 has no chunked coding: the relay leaves the framing to aiohttp's writer (the
    body runs to the end of the connection) instead of piping chunks."""
    behaviour = cluster["phi-3-mini"].behaviour
    behaviour.tokens, behaviour.token_delay = 5, 0.02  # one read per token
    body = orjson.dumps(chat("phi-3-mini", stream=True))
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 10)  # until the gateway closes
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert payload.startswith(b"data: ") and payload.endswith(b"data: [DONE]\n\n")
    assert payload.count(b"data: ") == 5 + 2  # the role chunk, five tokens and [DONE]
