"""Structured access log: one JSON line per finished request.

The request path only keeps each finished request's outcome; a background task gathers the
line's fields (from the outcome and the client's request), serialises them and writes them
out in batches, so no request waits on building a line, orjson, the disk or the terminal.
The response has been written to the client's connection by then, so its size is read from
aiohttp's own count (the writer's `output_size`): nothing is counted on the request path
for the log.

Fields, as nginx's and HAProxy's logs carry them: `client` (the peer's address; a proxy's
`X-Forwarded-For` as received, in `forwarded_for`), `method`, `status`, `error_code` (the
`code` of the gateway's own JSON error; null when the status came from the backend),
`verdict` (proxy.verdict: what the client got, e.g. `backend_failed` for a stream that broke
off after a 200), `queue_wait_ms`, `bytes_sent` (what was written to the client's connection
for the response, status line and headers included: nginx's `$bytes_sent`) and
`bytes_received` (the request body as read), `backend`, besides the timings, tokens and cost.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import IO, Any

import orjson
from aiohttp.abc import AbstractStreamWriter

from proxy.verdict import VERDICT_NAMES
from telemetry.outcome import Outcome, iso

MAX_PENDING_LINES = 100_000  # beyond this, lines are dropped and counted
FLUSH_INTERVAL = 0.5

Line = dict[str, Any]


def line_of(outcome: Outcome) -> tuple[Line, AbstractStreamWriter | None]:
    """The line's fields, and the writer whose count gives `bytes_sent` once written."""
    request = outcome.request
    line: Line = {
        "time": iso(outcome.started),
        "request_id": outcome.request_id,
        "client": None,
        "forwarded_for": None,
        "method": None,
        "route": outcome.route,
        "pool": outcome.pool,
        "model": outcome.model,
        "backend": outcome.backend,
        "status": outcome.status,
        "error_code": outcome.error_code,
        "verdict": VERDICT_NAMES[outcome.verdict],
        "stream": outcome.stream,
        "duration_ms": round(outcome.duration * 1000, 3),
        "ttft_ms": round(outcome.ttft * 1000, 3) if outcome.ttft is not None else None,
        "overhead_ms": round(outcome.overhead * 1000, 3),
        "queue_wait_ms": round(outcome.queue_wait * 1000, 3),
        "attempts": outcome.attempts,
        "fallback": outcome.fallback,
        "bytes_sent": None,
        "bytes_received": None,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "cost": outcome.cost,
    }
    if request is None:
        return line, None
    line["client"] = request.remote
    line["forwarded_for"] = request.headers.get("X-Forwarded-For")
    line["method"] = request.method
    line["bytes_received"] = request.content.total_bytes
    return line, request.writer


class AccessLog:
    def __init__(self, destination: str) -> None:
        self.destination = destination  # "-" for standard output, else a file path
        self.pending: list[Outcome] = []
        self.dropped = 0
        self.written = 0

    def add(self, outcome: Outcome) -> None:
        if len(self.pending) >= MAX_PENDING_LINES:
            self.dropped += 1
            return
        self.pending.append(outcome)  # nothing changes an outcome once it is recorded

    @staticmethod
    def serialise(pending: list[Outcome]) -> bytes:
        """On the event loop, a flush interval after the lines were added: every response
        recorded then has been handed to its connection (aiohttp writes it in the same loop
        step as the handler returns), so the writer's count is final."""
        lines = []
        for outcome in pending:
            line, writer = line_of(outcome)
            if writer is not None:
                line["bytes_sent"] = writer.output_size
            lines.append(orjson.dumps(line))
        return b"\n".join(lines) + b"\n"

    def _write(self, file: IO[bytes], data: bytes) -> None:
        file.write(data)
        file.flush()

    async def _flush(self, file: IO[bytes]) -> None:
        if self.pending:
            pending, self.pending = self.pending, []
            await asyncio.to_thread(self._write, file, self.serialise(pending))
            self.written += len(pending)

    async def running(self) -> AsyncIterator[None]:
        file: IO[bytes] = (
            sys.stdout.buffer if self.destination == "-" else open(self.destination, "ab")  # noqa: SIM115
        )

        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                await self._flush(file)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._flush(file)
            if file is not sys.stdout.buffer:
                file.close()
