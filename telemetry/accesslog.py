"""Structured access log: one JSON line per finished request.

Lines are serialised on the request path (orjson, about a microsecond) into a list that a
background task writes out in batches, so no request waits on the disk or the terminal.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import IO

import orjson

from telemetry.outcome import Outcome, iso

MAX_PENDING_LINES = 100_000  # beyond this, lines are dropped and counted
FLUSH_INTERVAL = 0.5


class AccessLog:
    def __init__(self, destination: str) -> None:
        self.destination = destination  # "-" for standard output, else a file path
        self.pending: list[bytes] = []
        self.dropped = 0
        self.written = 0

    def add(self, outcome: Outcome) -> None:
        if len(self.pending) >= MAX_PENDING_LINES:
            self.dropped += 1
            return
        self.pending.append(
            orjson.dumps(
                {
                    "time": iso(outcome.started),
                    "request_id": outcome.request_id,
                    "route": outcome.route,
                    "pool": outcome.pool,
                    "model": outcome.model,
                    "backend": outcome.backend,
                    "status": outcome.status,
                    "stream": outcome.stream,
                    "duration_ms": round(outcome.duration * 1000, 3),
                    "ttft_ms": round(outcome.ttft * 1000, 3) if outcome.ttft is not None else None,
                    "overhead_ms": round(outcome.overhead * 1000, 3),
                    "attempts": outcome.attempts,
                    "fallback": outcome.fallback,
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                    "cost": outcome.cost,
                }
            )
        )

    def _write(self, file: IO[bytes], lines: list[bytes]) -> None:
        file.write(b"\n".join(lines) + b"\n")
        file.flush()

    async def _flush(self, file: IO[bytes]) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            await asyncio.to_thread(self._write, file, lines)
            self.written += len(lines)

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
