"""A streamed body, however the backend frames it: sizes in either case or with leading zeros,
extensions, several chunks in one write, a chunk cut anywhere by the network, trailers. The
client gets the same body in valid HTTP/1.1 chunked coding, the backend's keep-alive connection
is reused for the next stream, and `usage` in the stream's last event is accounted.

The relay pipes each read's body parts from the upstream connection's read callback
(proxy.transport.UpstreamConnection.data_received, proxy.streaming.ChunkWriter); a client
reading the framing strictly (llhttp, through httptools) is the judge, since aiohttp's client
would hide a framing slip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
import orjson
import pytest

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(n: int, size: int = 20) -> bytes:
    return b"data: " + orjson.dumps({"n": n, "text": "x" * size}) + b"\n\n"


def framed(data: bytes, digits: bytes | None = None) -> bytes:
    return (digits if digits is not None else b"%x" % len(data)) + b"\r\n" + data + b"\r\n"


def usage_event() -> bytes:
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    return b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n"


EVENTS = [event(n) for n in range(6)]
LARGE = event(99, size=6000)  # past the relay's table of size lines (4 KiB)
DONE = b"data: [DONE]\n\n"

# Each scenario: the body's events, and the writes (the backend's bytes after its head, or
# with it, in the pieces it writes them, a pause between pieces so that each is its own read).
_whole = [framed(e) for e in EVENTS]
# A chunk of 0x25 bytes whose data, read from its second size digit on, also parses as whole
# chunks ("5", 5 bytes, "1a", 26 bytes): a relay that lost its place after a cut size line
# would pass on two chunks that are not the body.
DECOY = b"data:\r\n1a\r\n" + b"x" * 24 + b"\n\n"
assert len(DECOY) == 0x25
_upper = [framed(e, b"%X" % len(e)) for e in EVENTS]
SCENARIOS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "whole chunks": (EVENTS, [*_whole, b"0\r\n\r\n"]),
    "the last chunk and the end in one write": (EVENTS, [*_whole[:5], _whole[5] + b"0\r\n\r\n"]),
    "the head and the first chunk in one write": (
        EVENTS,
        [HEAD + _whole[0], *_whole[1:], b"0\r\n\r\n"],
    ),
    "upper-case sizes": (EVENTS, [*_upper, b"0\r\n\r\n"]),
    "leading zeros and an extension": (
        EVENTS[:3],
        [
            framed(EVENTS[0], b"00%x" % len(EVENTS[0])),
            framed(EVENTS[1], b"%x;name=value" % len(EVENTS[1])),
            framed(EVENTS[2]),
            b"0\r\n\r\n",
        ],
    ),
    "several chunks a write": (EVENTS, [b"".join(_whole[:3]), b"".join(_whole[3:]), b"0\r\n\r\n"]),
    "chunks cut anywhere": (
        EVENTS,
        [
            _whole[0][:3],  # cut inside the size line's CRLF
            _whole[0][3:] + _whole[1][:1],  # the rest, then one digit of the next size
            _whole[1][1:-1],  # up to the chunk's CR
            _whole[1][-1:] + _whole[2],  # its LF, then a whole chunk
            _whole[3][:-2],  # a chunk without its CRLF
            b"\r\n",
            _whole[4],
            _whole[5] + b"0\r",
            b"\n\r\n",
        ],
    ),
    "a cut that looks like whole chunks": (
        [EVENTS[0], DECOY, EVENTS[1]],
        [_whole[0] + b"2", framed(DECOY)[1:], _whole[1], b"0\r\n\r\n"],
    ),
    "a large chunk": (
        [EVENTS[0], LARGE, EVENTS[1]],
        [_whole[0], framed(LARGE), _whole[1], b"0\r\n\r\n"],
    ),
    "trailers": (EVENTS[:2], [*_whole[:2], b"0\r\nX-Checksum: abc\r\n\r\n"]),
    "usage in its own chunk": (
        [EVENTS[0], usage_event(), DONE],
        [_whole[0], framed(usage_event()), framed(DONE), b"0\r\n\r\n"],
    ),
}


class ScriptedStreams:
    """A backend that answers every request on a connection with the scenario's writes."""

    def __init__(self, writes: list[bytes]) -> None:
        self.writes = writes
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                if not self.writes[0].startswith(b"HTTP/"):  # else the scenario writes it
                    writer.write(HEAD)
                for piece in self.writes:
                    await asyncio.sleep(0.01)
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[list[bytes]], Awaitable[ScriptedStreams]]]:
    started: list[ScriptedStreams] = []

    async def start(writes: list[bytes]) -> ScriptedStreams:
        backend = ScriptedStreams(writes)
        backend.server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        assert backend.server is not None
        backend.server.close()
        await backend.server.wait_closed()


class StrictReader:
    """The client's side: the gateway's answer parsed by llhttp, which refuses bad framing."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def strict_streams(url: str, model: str, count: int = 1) -> list[tuple[int, bytes]]:
    """`count` streams one after the other on one keep-alive connection: a framing slip in
    one answer would also break the parse of the next."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps(chat(model, stream=True))
    answers = []
    try:
        for _ in range(count):
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            client = StrictReader()
            while not client.done:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the gateway closed the connection before the body's end"
                client.parser.feed_data(data)  # raises on a framing error
            answers.append((client.parser.get_status_code(), bytes(client.body)))
    finally:
        writer.close()
    return answers


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_client_gets_the_body_in_valid_framing_however_the_backend_cuts_it(
    scenario: str, cluster: Cluster, start_gateway: StartGateway, scripted
) -> None:
    events, writes = SCENARIOS[scenario]
    backend = await scripted(writes)
    gateway = await start_gateway(
        config_document(cluster, models={"phi-3-mini": {"endpoints": [{"url": backend.url}]}})
    )
    # The second stream reuses both connections: the client's, whose parser would stumble on
    # a framing slip, and the backend's, whose parser must have kept its place.
    answers = await strict_streams(gateway.url, "phi-3-mini", count=2)
    assert answers == [(200, b"".join(events))] * 2
    assert backend.connections == 1


async def test_usage_in_the_last_event_is_accounted(
    cluster: Cluster, start_gateway: StartGateway, scripted, tmp_path
) -> None:
    events, writes = SCENARIOS["usage in its own chunk"]
    backend = await scripted(writes)
    path = tmp_path / "access.jsonl"
    document = config_document(
        cluster,
        models={"phi-3-mini": {"endpoints": [{"url": backend.url}]}},
        logging={"access_log": str(path)},
    )
    gateway = await start_gateway(document)
    ((status, body),) = await strict_streams(gateway.url, "phi-3-mini")
    assert status == 200 and body == b"".join(events)
    for _ in range(40):  # written in batches every half second
        await asyncio.sleep(0.05)
        if path.exists() and path.read_bytes():
            break
    (line,) = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 5)
    assert line["bytes_sent"] > len(body)  # the head and the framing too
