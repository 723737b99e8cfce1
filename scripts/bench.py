#!/usr/bin/env python3
"""Benchmark the gateway against the simulated backends and print one table.

    python scripts/bench.py                 # 10 s per load phase
    python scripts/bench.py --smoke         # 2 s phases, for CI: keeps the script working

What it does, all on 127.0.0.1:
1. starts the simulators (one process) and measures them directly: the ceiling;
2. starts the gateway (`python -m proxy`, full request path: queue, balancer, breakers,
   metrics, accounting) pinned to core 0, simulators and load generators on the other core;
3. drives non-streamed chat completions with wrk (installed from Debian if missing, else a
   Python keep-alive load generator) at 50 connections;
4. measures the bare aiohttp pass-through (scripts/passthrough.py) the same way: the reference;
5. drives SSE streams with a Python load generator and counts the chunks relayed;
6. measures time to first byte, direct and through the gateway, and memory: RSS idle and
   per 1,000 idle keep-alive connections.
Gateway CPU comes from /proc (utime + stime of the gateway process and its children).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
MODEL = "phi-3-mini"
BODY = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "Hello"}]}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    except OSError:
        pass
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pinned(core: int | None, command: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(core), *command]


def ensure_wrk() -> str | None:
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    print("installing wrk from Debian packages...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True)
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True)
    return shutil.which("wrk")


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(wrk: str, url: str, connections: int, seconds: float, core: int | None) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = '{BODY.decode()}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        output = subprocess.run(
            pinned(
                core,
                [
                    wrk,
                    "-t1",
                    f"-c{connections}",
                    f"-d{max(1, round(seconds))}s",
                    "--latency",
                    "-s",
                    script.name,
                    url,
                ],
            ),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)

    def latency(label: str) -> float | None:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not match:
            return None
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in ([\d.]+)s", output).group(1))
    elapsed = float(re.search(r"(\d+) requests in ([\d.]+)s", output).group(2))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return LoadResult(
        requests,
        elapsed,
        p50_ms=latency("50%"),
        p99_ms=latency("99%"),
        errors=int(errors.group(1)) if errors else 0,
    )


async def python_load(url: str, connections: int, seconds: float) -> LoadResult:
    """Keep-alive HTTP/1.1 load over raw sockets: lighter than any HTTP client library."""
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    result = LoadResult(0, seconds)
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await reader.readexactly(length)
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.requests += 1
                if not head.startswith(b"HTTP/1.1 2"):
                    result.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    ordered = sorted(result.latencies_ms)
    if ordered:
        result.p50_ms = ordered[len(ordered) // 2]
        result.p99_ms = ordered[int(len(ordered) * 0.99)]
    return result


async def stream_load(url: str, streams: int, seconds: float) -> tuple[int, int]:
    """Concurrent SSE streams for `seconds`: (streams completed, SSE events received)."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    deadline = time.perf_counter() + seconds
    completed = events = 0
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            nonlocal completed, events
            while time.perf_counter() < deadline:
                async with session.post(url, json=body) as response:
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            events += 1
                completed += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return completed, events


async def ttfb_ms(url: str, samples: int) -> float:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(samples):
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.content.readline()
                times.append((time.perf_counter() - started) * 1000)
                await response.read()
    return statistics.median(times)


async def hold_connections(url: str, count: int) -> list[asyncio.StreamWriter]:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        await reader.readexactly(length)
        writers.append(writer)
    return writers


async def set_behaviour(url: str, **knobs: object) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/_sim/behaviour", json=knobs) as response:
            response.raise_for_status()


async def wait_up_post(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.poll() is not None:
                raise SystemExit(f"{process.args} exited early")
            try:
                async with session.post(url, data=BODY) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.poll() is not None:
                raise SystemExit(f"{process.args} exited early")
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def config_for(ports: dict[str, int], data: Path, accounting: bool = True) -> dict:
    models = {
        "mixtral-8x7b": (1.0, 10, 0.0027),
        "hermes-2": (0.8, 20, 0.0018),
        "openchat-3.5": (0.6, 50, 0.0012),
        "phi-3-mini": (0.4, 100, 0.0004),
    }
    return {
        "server": {"host": "127.0.0.1"},
        "accounting": {"enabled": accounting, "sqlite_path": str(data / "requests.db")},
        "logging": {"audit_log": str(data / "audit.jsonl")},
        "models": {
            name: {
                "weight": w,
                "max_concurrent": c,
                "cost_per_request": cost,
                "endpoints": [{"url": f"http://127.0.0.1:{ports[name]}"}],
            }
            for name, (w, c, cost) in models.items()
        },
        "qdrant": {
            "endpoints": [
                {"name": "qdrant-primary", "url": f"http://127.0.0.1:{ports['qdrant-primary']}"}
            ]
        },
        "embedding": {
            "endpoints": [
                {"name": "embedding-gpu0", "url": f"http://127.0.0.1:{ports['embedding-gpu0']}"}
            ]
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200, help="SSE chunks per stream")
    parser.add_argument("--smoke", action="store_true", help="2 s phases, small samples")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="SQL accounting off (issue 6's conditions: queue, balancer, breakers, metrics)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.tokens = 2.0, 50
    cores = os.cpu_count() or 1
    can_pin = not args.no_pin and cores >= 2 and shutil.which("taskset") is not None
    gateway_core, load_core = (0, 1) if can_pin else (None, None)
    wrk = ensure_wrk()

    names = [
        "mixtral-8x7b",
        "hermes-2",
        "openchat-3.5",
        "phi-3-mini",
        "qdrant-primary",
        "embedding-gpu0",
    ]
    ports = {name: free_port() for name in names}
    gateway_port = free_port()
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        data = Path(tmp)
        config_path = data / "bench.yaml"
        config_path.write_text(
            yaml.safe_dump(
                config_for(ports, data, accounting=not args.no_accounting), sort_keys=False
            )
        )
        python = sys.executable
        sims = subprocess.Popen(
            pinned(load_core, [python, "-m", "simulator", "--config", str(config_path)]),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        gateway = subprocess.Popen(
            pinned(
                gateway_core,
                [python, "-m", "proxy", "--config", str(config_path), "--port", str(gateway_port)],
            ),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            direct = f"http://127.0.0.1:{ports[MODEL]}"
            base = f"http://127.0.0.1:{gateway_port}"
            await wait_up(f"{direct}/health", sims)
            await wait_up(f"{base}/health/live", gateway)
            chat_direct = f"{direct}/v1/chat/completions"
            chat_gateway = f"{base}/v1/chat/completions"
            idle_rss = rss_mb(gateway.pid)

            async def load(url: str) -> LoadResult:
                if wrk:
                    return run_wrk(wrk, url, args.connections, args.duration, load_core)
                return await python_load(url, args.connections, args.duration)

            await load(chat_gateway) if args.smoke else None  # warm up connection pools
            ceiling = await load(chat_direct)
            cpu_before = cpu_seconds(gateway.pid)
            through = await load(chat_gateway)
            cpu_request_us = (cpu_seconds(gateway.pid) - cpu_before) / max(1, through.requests)

            await set_behaviour(direct, tokens=args.tokens, token_delay=0)
            cpu_before = cpu_seconds(gateway.pid)
            _, events = await stream_load(chat_gateway, args.streams, args.duration)
            cpu_chunk_us = (cpu_seconds(gateway.pid) - cpu_before) / max(1, events)

            await set_behaviour(direct, tokens=8, token_delay=0)
            samples = 50 if args.smoke else 300
            ttfb_direct = await ttfb_ms(chat_direct, samples)
            ttfb_gateway = await ttfb_ms(chat_gateway, samples)

            bare_port = free_port()
            bare = subprocess.Popen(
                pinned(
                    gateway_core,
                    [python, str(ROOT / "scripts" / "passthrough.py"), str(bare_port), direct],
                ),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                bare_url = f"http://127.0.0.1:{bare_port}/v1/chat/completions"
                await wait_up_post(bare_url, bare)
                cpu_before = cpu_seconds(bare.pid)
                reference = await load(bare_url)
                bare_us = (cpu_seconds(bare.pid) - cpu_before) / max(1, reference.requests)
            finally:
                bare.send_signal(signal.SIGTERM)
                bare.wait(timeout=15)

            before_hold = rss_mb(gateway.pid)
            held = await hold_connections(base, 1000)
            await asyncio.sleep(0.5)
            per_thousand = rss_mb(gateway.pid) - before_hold
            for writer in held:
                writer.close()
        finally:
            for process in (gateway, sims):
                process.send_signal(signal.SIGTERM)
            for process in (gateway, sims):
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()

    generator = "wrk" if wrk else "python"
    pinning = "unpinned" if gateway_core is None else "gateway on core 0, load + backends on core 1"
    rows = [
        ("load generator", f"{generator}, {args.connections} connections, {pinning}"),
        (
            "request path",
            "queue, balancer, breakers, metrics"
            + ("" if args.no_accounting else ", SQLite accounting"),
        ),
        ("direct ceiling (one simulator)", f"{ceiling.rps:,.0f} req/s"),
        ("gateway requests/s", f"{through.rps:,.0f} req/s ({through.errors} errors)"),
        ("ratio to direct ceiling", f"{through.rps / ceiling.rps:.2f}" if ceiling.rps else "-"),
        (
            "gateway latency p50 / p99",
            f"{through.p50_ms or 0:.2f} ms / {through.p99_ms or 0:.2f} ms",
        ),
        ("gateway CPU per request", f"{cpu_request_us * 1e6:,.1f} µs"),
        (
            "bare aiohttp pass-through (same run)",
            f"{reference.rps:,.0f} req/s, {bare_us * 1e6:,.1f} µs CPU per request",
        ),
        ("gateway CPU per SSE chunk", f"{cpu_chunk_us * 1e6:,.1f} µs ({events:,} chunks)"),
        ("TTFB p50 direct / gateway", f"{ttfb_direct:.3f} ms / {ttfb_gateway:.3f} ms"),
        ("added TTFB p50", f"{ttfb_gateway - ttfb_direct:.3f} ms"),
        ("RSS idle", f"{idle_rss:.1f} MB"),
        ("RSS per 1,000 idle keep-alive connections", f"{per_thousand:.1f} MB"),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    asyncio.run(main())
