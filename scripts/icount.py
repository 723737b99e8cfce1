#!/usr/bin/env python3
"""Instructions per request and per relayed chunk, counted by valgrind's callgrind: the
figures of the README's round-two table (issue 14). On a shared host CPU time varies 2x from
run to run; instruction counts repeat within about 1%, so a step can be measured before and
after on its own.

    python scripts/icount.py                      # this tree
    python scripts/icount.py --tree /other/tree   # another checkout (simulators from this one)

What it does: starts the simulators and the gateway (`python -m proxy` under callgrind with
instrumentation off, PYTHONHASHSEED=0) on the benchmark's config (scripts/bench.py, accounting
on) plus one model whose only backend is a closed port and falls back to phi-3-mini; then for
each phase warms up, switches instrumentation on, drives the phase, switches it off and dumps:

- plain: 2,000 keep-alive POSTs over 10 raw connections naming phi-3-mini;
- auto, fallback: the same with `"model": "auto"` and with the model that falls back (both
  rewrite the body's model name);
- stream: 200 unpaced SSE streams of 50 tokens (chunks coalesce: one read carries several);
- paced: 40 SSE streams, 5 at a time, of 32 tokens 20 ms apart (each token its own read);
- paced-long: the same with four times the tokens;
- idle: 3 s of nothing, the gateway's background work alone.

Per request: a phase's instructions / its requests. Per chunk: instructions / SSE events the
client received, the stream's own request included (as scripts/bench.py divides CPU time).
From paced and paced-long, less the idle rate over each phase's duration, the paced chunk is
also split into what one more chunk costs (the relay) and what each stream costs once (its
request, head, accounting).
Each phase includes the writing of its own accounting rows and 1.5 s of the gateway's idle
background work (health checks, timers: about 0.6 million instructions a second).
Callgrind counts user-space instructions of every thread, not system calls' kernel work.
Needs valgrind (`apt-get install valgrind`); a run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODEL, config_for, free_port, native_state, wait_up  # noqa: E402  (the benchmark's own)

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "Hello"}]}'
STREAM_BODY = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
FALLING_BACK = "gone-model"
PHASES = ("plain", "auto", "fallback", "stream", "paced", "paced-long")
# Accounting writes its rows every second (accounting.flush_interval): a phase starts after the
# rows before it are written and ends after its own are, so each request's row is counted in
# its own phase (a paced stream is one row per 34 chunks: 28,000 instructions a row).
FLUSHED = 1.5


async def posts(port: int, total: int, body: bytes, connections: int = 10) -> dict[str, int]:
    """Exactly `total` keep-alive POSTs over `connections` raw connections; statuses counted."""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    remaining = [total]
    statuses: dict[str, int] = {}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"(?i)content-length: (\d+)", head)
                assert found is not None, head
                await reader.readexactly(int(found.group(1)))
                status = head.split(b" ", 2)[1].decode()
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


async def streams(port: int, total: int, connections: int) -> tuple[dict[str, int], int]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    remaining = [total]
    statuses: dict[str, int] = {}
    events = [0]
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                async with session.post(url, json=STREAM_BODY) as response:
                    status = str(response.status)
                    statuses[status] = statuses.get(status, 0) + 1
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            events[0] += 1

        await asyncio.gather(*(one() for _ in range(connections)))
    return statuses, events[0]


async def requests(port: int, total: int, body: bytes) -> tuple[dict[str, int], int]:
    return await posts(port, total, body), total


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=600)


def totals(out: Path, pid: int) -> dict[str, int]:
    """Instructions per dumped phase, from the dumps' `totals:` lines."""
    found = {}
    for dump in out.glob(f"callgrind-{pid}.out.*"):
        text = dump.read_text()
        trigger = re.search(r"Trigger: dump ([\w-]+)", text)
        total = re.search(r"^totals: (\d+)", text, re.M)
        if trigger and total:
            found[trigger.group(1)] = int(total.group(1))
    return found


async def measure(args: argparse.Namespace, out: Path) -> None:
    tree = Path(args.tree).resolve()
    names = ["mixtral-8x7b", "hermes-2", "openchat-3.5", MODEL, "qdrant-primary", "embedding-gpu0"]
    ports = {name: free_port() for name in names}
    port = free_port()
    config = config_for(ports, out)
    simulators_config = out / "simulators.yaml"
    simulators_config.write_text(yaml.safe_dump(config, sort_keys=False))
    config["models"][FALLING_BACK] = {"endpoints": [{"url": f"http://127.0.0.1:{free_port()}"}]}
    config["fallbacks"] = {FALLING_BACK: [MODEL]}
    gateway_config = out / "gateway.yaml"
    gateway_config.write_text(yaml.safe_dump(config, sort_keys=False))

    python = sys.executable
    simulators = subprocess.Popen(
        [python, "-m", "simulator", "--config", str(simulators_config)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind-%p.out",
            python,
            "-m",
            "proxy",
            "--config",
            str(gateway_config),
            "--port",
            str(port),
        ],
        cwd=tree,
        env=dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid = str(gateway.pid)
    units: dict[str, int] = {}
    seconds: dict[str, float] = {}
    try:
        direct = f"http://127.0.0.1:{ports[MODEL]}"
        await wait_up(f"{direct}/health", simulators, patience=300)
        await wait_up(f"http://127.0.0.1:{port}/health/live", gateway, patience=300)

        async def phase(name: str, run: Awaitable[tuple[dict[str, int], int]]) -> None:
            await asyncio.sleep(FLUSHED)  # the warm-up's accounting rows are written
            callgrind_control("-i", "on", pid)
            started = time.perf_counter()
            statuses, count = await run
            await asyncio.sleep(FLUSHED)  # and this phase's, within it
            callgrind_control("-i", "off", pid)
            seconds[name] = time.perf_counter() - started
            callgrind_control("-d", name, pid)
            assert set(statuses) == ({"200"} if name != "idle" else set()), (name, statuses)
            units[name] = count
            print(f"{name}: {statuses}, {count} units", file=sys.stderr)

        async def behave(**knobs: float) -> None:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{direct}/_sim/behaviour", json=knobs) as response:
                    response.raise_for_status()

        for name, model in (("plain", MODEL), ("auto", "auto"), ("fallback", FALLING_BACK)):
            body = BODY.replace(MODEL.encode(), model.encode())
            await posts(port, args.warm, body)
            await phase(name, requests(port, args.n, body))
        await behave(tokens=50, token_delay=0)
        await streams(port, 20, 10)
        await phase("stream", streams(port, 200, 10))
        await behave(tokens=args.paced_tokens, token_delay=args.token_delay / 1000)
        await streams(port, args.paced_at_once, args.paced_at_once)
        await phase("paced", streams(port, args.paced_streams, args.paced_at_once))
        await behave(tokens=4 * args.paced_tokens, token_delay=args.token_delay / 1000)
        await phase("paced-long", streams(port, args.paced_streams, args.paced_at_once))

        async def nothing() -> tuple[dict[str, int], int]:
            await asyncio.sleep(3)
            return {}, 1  # no requests; one unit: the phase

        await phase("idle", nothing())
    finally:
        for process in (gateway, simulators):
            process.send_signal(signal.SIGTERM)
        for process in (gateway, simulators):
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
    counted = totals(out, gateway.pid)
    print(
        f"instructions ({tree}, {time.strftime('%Y-%m-%d %H:%M')},"
        f" request path {native_state(tree)}):"
    )
    for name in PHASES:
        what = "request" if name in ("plain", "auto", "fallback") else "chunk"
        print(f"  {name:10s} {counted[name] / units[name]:>10,.0f} per {what}")
    print(
        f"  auto / plain {counted['auto'] / counted['plain']:.3f},"
        f" fallback / plain {counted['fallback'] / counted['plain']:.3f}"
    )
    idle_rate = counted["idle"] / seconds["idle"]
    short, long = (counted[name] - idle_rate * seconds[name] for name in ("paced", "paced-long"))
    per_chunk = (long - short) / (units["paced-long"] - units["paced"])
    per_stream = (short - per_chunk * units["paced"]) / args.paced_streams
    print(
        f"  paced, idle work taken out: {per_chunk:,.0f} per chunk more,"
        f" {per_stream:,.0f} per stream once ({idle_rate:,.0f} a second idle)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(ROOT), help="the checkout to measure")
    parser.add_argument("--n", type=int, default=2000, help="requests per request phase")
    parser.add_argument("--warm", type=int, default=300, help="warm-up requests per phase")
    parser.add_argument("--paced-streams", type=int, default=40)
    parser.add_argument("--paced-at-once", type=int, default=5, help="concurrent paced streams")
    parser.add_argument("--paced-tokens", type=int, default=32)
    parser.add_argument("--token-delay", type=float, default=20.0, help="ms between tokens")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    args = parser.parse_args()
    if args.keep:
        out = Path(tempfile.mkdtemp(prefix="icount-"))
        print(f"dumps in {out}", file=sys.stderr)
        asyncio.run(measure(args, out))
    else:
        with tempfile.TemporaryDirectory(prefix="icount-") as tmp:
            asyncio.run(measure(args, Path(tmp)))


if __name__ == "__main__":
    main()
