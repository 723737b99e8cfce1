"""Slow and greedy clients (issue 11, item 4), over raw sockets: a head that trickles in gets
408, so does a body that goes silent, an address over its connection cap gets 429, and none of
it touches a client that keeps to the rules (a keep-alive connection idle between requests)."""

from __future__ import annotations

import asyncio

import orjson

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document

LIMITS = {"header_timeout": 0.4, "body_timeout": 0.4, "max_connections_per_client": 3}
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n"
)


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["Content-Length"]))
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def test_a_head_that_trickles_in_gets_408_and_the_connection_closes(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster, server=LIMITS))
    reader, writer = await connect(gateway.url)
    status = None
    for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n":
        writer.write(bytes([byte]))  # one byte every 50 ms: slowloris
        await asyncio.sleep(0.05)
        if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
            status, headers, body = await answer(reader)
            break
    assert status == 408, status
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert await reader.read() == b""  # closed
    await close(writer)
    assert gateway.runtime.telemetry.refused == {408: 1}  # counted before routing


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster, server=LIMITS))
    reader, writer = await connect(gateway.url)
    status, _, _ = await answer(reader)
    assert status == 408 and await reader.read() == b""
    await close(writer)


async def test_a_silent_body_gets_408_and_the_connection_closes(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster, server=LIMITS))
    reader, writer = await connect(gateway.url)
    body = orjson.dumps(chat("hermes-2"))
    writer.write(REQUEST % len(body) + body[:10])  # then nothing
    status, headers, data = await answer(reader)
    assert status == 408 and headers["connection"] == "close"
    assert orjson.loads(data)["error"]["code"] == "request_timeout"
    assert await reader.read() == b""
    assert cluster["hermes-2"].behaviour.requests == 0  # nothing half-read went upstream
    await close(writer)


async def test_a_keep_alive_client_idle_between_requests_is_not_timed_out(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster, server=LIMITS))
    reader, writer = await connect(gateway.url)
    body = orjson.dumps(chat("hermes-2"))
    for _ in range(3):
        writer.write(REQUEST % len(body) + body)
        status, _, _ = await answer(reader)
        assert status == 200
        await asyncio.sleep(0.6)  # longer than the head timeout, between requests
    await close(writer)


async def test_an_address_over_its_connection_cap_gets_429(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster, server=LIMITS))
    held = [await connect(gateway.url) for _ in range(3)]
    body = orjson.dumps(chat("hermes-2"))
    for reader, writer in held:  # each of the three serves
        writer.write(REQUEST % len(body) + body)
        assert (await answer(reader))[0] == 200
    reader, writer = await connect(gateway.url)
    status, _, data = await answer(reader)
    assert status == 429 and orjson.loads(data)["error"]["code"] == "too_many_connections"
    await close(writer)
    await close(held[0][1])
    await asyncio.sleep(0.1)
    reader, writer = await connect(gateway.url)  # a place came free
    writer.write(REQUEST % len(body) + body)
    assert (await answer(reader))[0] == 200
    for _, other in [*held[1:], (reader, writer)]:
        await close(other)


async def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    """Issue 11: the gateway answered `Expect: 100-continue` with 100 Continue even for a
    Content-Length already over the limit. Now 413 at once; a body within it is invited."""
    gateway = await start_gateway(config_document(cluster, server={"max_body_bytes": 1000}))
    reader, writer = await connect(gateway.url)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, headers, body = await answer(reader)
    assert status == 413 and orjson.loads(body)["error"]["code"] == "payload_too_large"
    await close(writer)

    reader, writer = await connect(gateway.url)
    payload = orjson.dumps(chat("hermes-2"))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(payload)
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(payload)
    assert (await answer(reader))[0] == 200
    await close(writer)


async def test_only_qdrant_methods_pass_through(gateway, http) -> None:
    async with http.request("TRACE", f"{gateway.url}/qdrant/collections") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    async with http.get(f"{gateway.url}/qdrant/collections") as response:
        assert response.status == 200


async def test_a_buffered_answer_carries_what_aiohttp_would_add_and_keeps_alive_as_asked(
    gateway,
) -> None:
    """proxy.attempt.SerialisedResponse writes a backend's buffered answer itself: the
    backend's headers, ours, Content-Length, and the Connection header keep-alive requires,
    for HTTP/1.1 and HTTP/1.0 clients alike."""
    body = orjson.dumps(chat("hermes-2"))
    request = (
        b"POST /v1/chat/completions HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n%s"
    )
    length = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    reader, writer = await connect(gateway.url)
    for _ in range(2):  # kept alive
        writer.write(request % (b"1.1", length))
        status, headers, answer_body = await answer(reader)
        assert status == 200 and orjson.loads(answer_body)["model"] == "hermes-2"
        assert headers["content-type"].startswith("application/json")
        assert {"date", "server", "x-request-id", "x-router-overhead-ms"} <= set(headers)
        assert headers["x-router-backend"] == "hermes-2" and headers["x-router-attempts"] == "1"
        assert "connection" not in headers and "transfer-encoding" not in headers
    writer.write(request % (b"1.1", b"Connection: close\r\n" + length))
    status, headers, _ = await answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    await close(writer)

    reader, writer = await connect(gateway.url)
    writer.write(request % (b"1.0", b"Connection: keep-alive\r\n" + length))
    status, headers, _ = await answer(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    writer.write(request % (b"1.0", length))  # no keep-alive asked: closed after the answer
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.0 200") and b"onnection" not in head
    await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await close(writer)
