"""The upstream transport against a scripted backend: a real socket server that answers each
request with the bytes a test gives it, including the ones a well-behaved server never sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from proxy.transport import (
    ConnectFailed,
    StaleConnection,
    Timeouts,
    UpstreamBroken,
    UpstreamClient,
)

QUICK = Timeouts(connect=2, total=5)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Closing(bytes):
    """A reply after which the backend closes the connection."""


# What the backend does with the n-th request of a connection: send bytes, close without
# answering (None), or stay open and silent (...).
Reply = bytes | None | type(Ellipsis)


@dataclass
class ScriptedBackend:
    replies: Callable[[int, bytes], Reply]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.replies(served, request)
                served += 1
                if reply is None:
                    return
                if reply is Ellipsis:
                    await reader.read()  # silent until the client closes
                    return
                assert isinstance(reply, bytes)
                writer.write(reply)
                await writer.drain()
                if isinstance(reply, Closing):
                    return
        finally:
            self.closed.set()
            writer.close()


@pytest.fixture
async def backend_with() -> AsyncIterator[
    Callable[[Callable[[int, bytes], Reply]], ScriptedBackend]
]:
    started: list[ScriptedBackend] = []

    async def start(replies: Callable[[int, bytes], Reply]) -> ScriptedBackend:
        backend = ScriptedBackend(replies)
        backend.server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
        started.append(backend)
        return backend

    yield start  # type: ignore[misc]
    for backend in started:
        assert backend.server is not None
        backend.server.close()
        await backend.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(limit=100, keepalive_timeout=30)
    yield upstream
    await upstream.close()


def start_line(backend: ScriptedBackend, method: str = "POST", path: str = "/v1/x") -> bytes:
    host = backend.url.removeprefix("http://")
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode()


async def exchange(
    client: UpstreamClient,
    backend: ScriptedBackend,
    body: bytes | None = b"{}",
    *,
    method: str = "POST",
    timeouts: Timeouts = QUICK,
) -> tuple[int, bytes]:
    response = await client.request(
        client.origin(backend.url),
        start_line(backend, method),
        b"X-Test: 1\r\n",
        body,
        timeouts,
    )
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def test_requests_go_out_whole_and_connections_are_kept_alive(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: OK)
    for _ in range(3):
        assert await exchange(client, backend, b'{"a": 1}') == (200, b"{}")
    assert backend.connections == 1
    host = backend.url.removeprefix("http://").encode()
    assert backend.requests[0] == (
        b"POST /v1/x HTTP/1.1\r\nHost: " + host + b"\r\nX-Test: 1\r\n"
        b"Content-Length: 8\r\n\r\n" + b'{"a": 1}'
    )
    assert await exchange(client, backend, None, method="GET") == (200, b"{}")
    assert b"Content-Length" not in backend.requests[-1]


async def test_a_large_body_is_sent_after_the_head(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: OK)
    body = b"x" * 300_000
    assert await exchange(client, backend, body) == (200, b"{}")
    assert backend.requests[0].endswith(b"Content-Length: 300000\r\n\r\n" + body)


async def test_connection_close_is_honoured(backend_with, client) -> None:
    # the backend says it will close but keeps the socket open: the client must not reuse it
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    backend = await backend_with(lambda n, request: closing)
    assert await exchange(client, backend) == (200, b"ok")
    await asyncio.wait_for(backend.closed.wait(), 2)  # closed by the client
    assert await exchange(client, backend) == (200, b"ok")
    assert backend.connections == 2


async def test_chunked_and_connection_delimited_bodies_are_read_whole(backend_with, client) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    backend = await backend_with(lambda n, request: chunked)
    assert await exchange(client, backend) == (200, b"hello world")
    assert await exchange(client, backend) == (200, b"hello world")
    assert backend.connections == 1

    until_close = Closing(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    closing = await backend_with(lambda n, request: until_close)
    assert await exchange(client, closing) == (200, b"all of it")


async def test_a_cut_off_body_is_an_error(backend_with, client) -> None:
    cut = Closing(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten...")
    backend = await backend_with(lambda n, request: cut)
    with pytest.raises(UpstreamBroken, match="mid-response"):
        await exchange(client, backend)


async def test_interim_responses_are_skipped(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert await exchange(client, backend) == (200, b"{}")
    assert await exchange(client, backend) == (200, b"{}")


async def test_head_responses_have_no_body_whatever_their_length(backend_with, client) -> None:
    backend = await backend_with(
        lambda n, request: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    )
    assert await exchange(client, backend, None, method="HEAD") == (200, b"")
    assert await exchange(client, backend, None, method="HEAD") == (200, b"")


async def test_a_second_answer_to_one_request_retires_the_connection(backend_with, client):
    backend = await backend_with(lambda n, request: OK + OK)
    assert await exchange(client, backend) == (200, b"{}")
    await asyncio.wait_for(backend.closed.wait(), 2)  # not kept for the next request
    assert await exchange(client, backend) == (200, b"{}")
    assert backend.connections == 2


async def test_endless_headers_are_cut_off(backend_with, client) -> None:
    flood = b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"a" * 200_000
    backend = await backend_with(lambda n, request: flood)
    with pytest.raises(UpstreamBroken, match="headers exceed"):
        await exchange(client, backend)
    await asyncio.wait_for(backend.closed.wait(), 2)


async def test_garbage_is_not_http(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: b"SSH-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(UpstreamBroken, match="invalid HTTP response"):
        await exchange(client, backend)
    await asyncio.wait_for(backend.closed.wait(), 2)


async def test_silence_before_the_headers_times_out_and_closes(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: ...)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await exchange(client, backend, timeouts=Timeouts(connect=2, first_byte=0.2, total=5))
    assert asyncio.get_running_loop().time() - started < 1
    await asyncio.wait_for(backend.closed.wait(), 2)  # the backend's work is abandoned


async def test_a_keep_alive_connection_keeps_one_timer_and_earlier_deadlines_still_fire(
    backend_with, client
) -> None:
    """The exchange timer outlives its exchange (UpstreamConnection._arm): the next requests
    on the connection arm none while it fires no later than they need, and a request with an
    earlier deadline still times out on time."""
    backend = await backend_with(lambda n, request: OK if n < 3 else ...)
    assert await exchange(client, backend) == (200, b"{}")
    connection = client.origin(backend.url).idle[-1]
    timer = connection._timer
    assert timer is not None
    for _ in range(2):
        assert await exchange(client, backend) == (200, b"{}")
        assert connection._timer is timer
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await exchange(client, backend, timeouts=Timeouts(connect=2, first_byte=0.2, total=5))
    assert asyncio.get_running_loop().time() - started < 1
    assert backend.connections == 1


async def test_a_stream_that_goes_quiet_times_out(backend_with, client) -> None:
    def stall_after_one_chunk(n: int, request: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n"

    backend = await backend_with(stall_after_one_chunk)
    response = await client.request(
        client.origin(backend.url), start_line(backend), b"", b"{}", Timeouts(idle=0.2)
    )
    try:
        assert await response.readany() == b"data: "
        with pytest.raises(TimeoutError):
            await response.readany()
    finally:
        response.release()


async def test_a_kept_alive_connection_closed_before_answering_is_stale(backend_with, client):
    backend = await backend_with(lambda n, request: OK if n == 0 else None)
    assert await exchange(client, backend) == (200, b"{}")
    with pytest.raises(StaleConnection):
        await exchange(client, backend)
    # on a new connection the same failure is no longer "stale": nothing was reused
    fresh = await backend_with(lambda n, request: None)
    with pytest.raises(UpstreamBroken):
        await exchange(client, fresh)


async def test_nothing_listening_is_a_connect_failure(client) -> None:
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await client.request(
            client.origin("http://127.0.0.1:9"), b"GET / HTTP/1.1\r\n", b"", None, QUICK
        )


async def test_the_per_host_limit_queues_for_a_connection(backend_with) -> None:
    backend = await backend_with(lambda n, request: OK)
    upstream = UpstreamClient(limit_per_host=1)
    try:
        results = await asyncio.gather(*(exchange(upstream, backend) for _ in range(4)))
    finally:
        await upstream.close()
    assert results == [(200, b"{}")] * 4
    assert backend.connections == 1


async def test_idle_connections_expire(backend_with) -> None:
    backend = await backend_with(lambda n, request: OK)
    upstream = UpstreamClient(keepalive_timeout=0.1)
    try:
        await exchange(upstream, backend)
        await asyncio.sleep(0.3)
        await asyncio.wait_for(backend.closed.wait(), 2)  # swept, not left open
        await exchange(upstream, backend)
    finally:
        await upstream.close()
    assert backend.connections == 2


async def test_a_cancelled_request_closes_its_connection(backend_with, client) -> None:
    backend = await backend_with(lambda n, request: ...)
    task = asyncio.create_task(exchange(client, backend))
    while not backend.requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(backend.closed.wait(), 2)


async def test_closing_the_client_ends_requests_in_flight(backend_with) -> None:
    backend = await backend_with(lambda n, request: ...)
    upstream = UpstreamClient()
    task = asyncio.create_task(exchange(upstream, backend))
    while not backend.requests:
        await asyncio.sleep(0.01)
    await upstream.close()
    with pytest.raises(UpstreamBroken, match="gateway closed"):
        await asyncio.wait_for(task, 2)
