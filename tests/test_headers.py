"""proxy.headers: the answer headers a client gets, as a multidict (aiohttp's answers) and as
the lines the gateway writes itself (SerialisedResponse, ChunkedStream): the same headers."""

from __future__ import annotations

from proxy.headers import (
    HAS_CONTENT_TYPE,
    HAS_DATE,
    HAS_SERVER,
    client_response_headers,
    client_response_lines,
)

RAW = [
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"2"),
    (b"Connection", b"keep-alive, X-Hop"),
    (b"Keep-Alive", b"timeout=5"),
    (b"X-Hop", b"one hop only"),
    (b"Transfer-Encoding", b"chunked"),
    (b"x-router-backend", b"the backend's own gateway"),
    (b"x-router-attempts", b"3"),
    (b"x-router-fallback", b"another-model"),
    (b"Date", b"Mon, 30 Nov 2026 00:00:00 GMT"),
    (b"Set-Cookie", b"a=1"),
    (b"Set-Cookie", b"b=2"),
]


def parsed(lines: bytes) -> list[tuple[str, str]]:
    return [
        (name.lower(), value)
        for name, _, value in (line.partition(": ") for line in lines.decode().split("\r\n"))
        if name
    ]


def test_the_lines_carry_what_the_multidict_does() -> None:
    headers = client_response_headers(RAW, "hermes-2", "req-1")
    headers["x-router-attempts"] = "1"  # as proxy.attempt sets it
    lines, given = client_response_lines(RAW, "hermes-2", "req-1")
    ours = b"x-router-attempts: 1\r\n"
    assert sorted(parsed(lines + ours)) == sorted((k.lower(), v) for k, v in headers.items())
    assert given == HAS_CONTENT_TYPE | HAS_DATE
    assert ("x-router-fallback", "another-model") in parsed(lines)  # not set by us here


def test_a_fallback_replaces_the_backends_fallback_header() -> None:
    lines, given = client_response_lines([(b"Server", b"vllm")], "b", "r", fallback=True)
    assert parsed(lines) == [("server", "vllm"), ("x-router-backend", "b"), ("x-request-id", "r")]
    assert given == HAS_SERVER
    lines, _ = client_response_lines(RAW, "b", "r", fallback=True)
    assert "x-router-fallback" not in dict(parsed(lines))
