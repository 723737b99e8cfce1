#!/usr/bin/env python3
"""Benchmark the gateway against the simulated backends and print one table.

    python scripts/bench.py                 # 10 s per load phase
    python scripts/bench.py --replicas 4    # also one model on 4 replicas, as the peers get it
    python scripts/bench.py --replicas 4 --compare-vllm-router   # and vllm-router beside us
    python scripts/bench.py --redis         # also the gateway with redis: on vs off
    python scripts/bench.py --workers 2     # also 1 worker against 2 (--workers)
    python scripts/bench.py --smoke         # 1 s phases, for CI: keeps the script working

What it does, all on 127.0.0.1:
1. starts the simulators (one process) and measures them directly: the ceiling;
2. starts the gateway (`python -m proxy`, full request path: queue, balancer, breakers,
   metrics, accounting) pinned to core 0, simulators and load generators (this process
   included) on the other core;
3. drives non-streamed chat completions with wrk (installed from Debian if missing, else a
   Python keep-alive load generator) at 50 connections;
4. drives SSE streams two ways and counts the chunks relayed: unpaced (200 tokens with no
   delay, so one read and one write carry many chunks: "coalesced"), and paced as a real model
   emits them (200 concurrent streams of 32 tokens 10 ms apart, each token its own read and
   write);
5. measures the bare aiohttp pass-through (scripts/passthrough.py) the same ways, non-streamed
   and paced: the reference, with ratios from the same run;
6. measures time to first byte, direct and through the gateway, and memory: RSS idle and
   per 1,000 idle keep-alive connections;
7. with `--replicas N`: one model on N simulators, round robin, no concurrency cap below the
   load (the work a peer router such as vllm-router does), the gateway, the bare pass-through
   (round robin over the same replicas) and, with `--compare-vllm-router`, vllm-router
   (`pip install vllm-router`; `--worker-urls ... --policy round_robin`), each non-streamed and
   paced, and paced again with 2 tokens a stream, which splits a paced chunk into what a
   stream costs once (its request, head and end) and what each further chunk costs; every
   target in `--rounds` rounds (2), the order reversed every other round, added up.
8. with `--redis`: the gateway with the `redis:` section off and on (a local redis-server,
   pinned with the load), one after the other, twice, non-streamed under wrk, with a global
   rate limit too high to refuse anything so the limit sync has work: CPU per request (the
   sync's own CPU included) and idle CPU per second. Nothing is on the request path, so the
   two should be within a few percent.
9. with `--workers N`: the gateway with 1 worker pinned to core 0, then with N workers (the
   supervisor and its workers allowed on every core, so they share core 1 with the load and
   the simulators on a 2-core machine), alternately, twice, non-streamed under wrk: requests
   per second and CPU per request of all the gateway's processes. On two cores this shows
   what a second worker costs and how far it lifts throughput while competing with the load
   generator; it cannot show scaling to N free cores.
Target CPU comes from /proc (utime + stime of the process, its threads and its children).
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
MODEL = "phi-3-mini"
BODY = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "Hello"}]}'
STREAM_BODY = (
    b'{"model": "' + MODEL.encode() + b'", "stream": true,'
    b' "messages": [{"role": "user", "content": "Hi"}]}'
)
PLAIN = {"tokens": 8, "token_delay": 0}  # the simulator's defaults: non-streamed phases, TTFB
SHORT_TOKENS = 2  # replicas mode: short paced streams, for the per-stream / per-chunk split
IDLE_SECONDS = 5.0  # --redis: how long idle CPU is measured (CPU time comes in 10 ms ticks)


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


@dataclass
class StreamResult:
    streams: int = 0
    chunks: int = 0
    errors: int = 0
    durations_ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # of the target, over the phase

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.durations_ms) if self.durations_ms else 0.0

    @property
    def per_chunk(self) -> float:
        return self.cpu_seconds / max(1, self.chunks)

    @property
    def per_stream(self) -> float:
        return self.cpu_seconds / max(1, self.streams)


async def read_events(reader: asyncio.StreamReader, head: bytes) -> tuple[int, bool]:
    """Read one response body after `head`: (SSE events in it, connection reusable)."""
    lowered = head.lower()
    length = re.search(rb"\r\ncontent-length: *(\d+)", lowered)
    if length:
        return (await reader.readexactly(int(length.group(1)))).count(b"data: "), True
    if not re.search(rb"\r\ntransfer-encoding: *chunked", lowered):
        return (await reader.read()).count(b"data: "), False
    events, tail, ending = 0, b"", b""
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError("stream ended before its last chunk")
        window = tail + data  # a "data: " split across reads is counted once
        events += window.count(b"data: ")
        tail = window[-5:]
        ending = (ending + data)[-7:]
        if ending == b"\r\n0\r\n\r\n":
            return events, b"connection: close" not in lowered


async def paced_load(url: str, streams: int, seconds: float) -> StreamResult:
    """`streams` keep-alive connections, each asking for one SSE stream after another until
    `seconds` have passed, counting the events received. Raw sockets: this load generator
    shares its core with the simulators, and must not be what limits the rate."""
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/.*)", url).groups()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    result = StreamResult()
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        writer: asyncio.StreamWriter | None = None
        while time.perf_counter() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                events, reusable = await read_events(reader, head)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                result.errors += 1
                reusable = False
                await asyncio.sleep(0.01)
            else:
                if head.startswith(b"HTTP/1.1 200"):
                    result.streams += 1
                    result.chunks += events
                    result.durations_ms.append((time.perf_counter() - started) * 1000)
                else:
                    result.errors += 1
            if not reusable and writer is not None:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(streams)))
    return result


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


async def wait_up(
    url: str, process: subprocess.Popen[bytes], body: bytes | None = None, patience: float = 10.0
) -> None:
    """Until `url` answers below 500 (a GET, or a POST of `body`) within `patience` seconds,
    while `process` runs. scripts/icount.py gives a gateway under valgrind minutes."""
    deadline = time.monotonic() + patience
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{process.args!r} exited early ({process.returncode})")
            try:
                method = "GET" if body is None else "POST"
                async with session.request(method, url, data=body) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def wait_up_post(url: str, process: subprocess.Popen[bytes]) -> None:
    """Until a chat completion POSTed to `url` is answered (routers with no health route)."""
    await wait_up(url, process, BODY)


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


def replicas_config(ports: list[int], data: Path, accounting: bool, cap: int) -> dict[str, Any]:
    """One model on several replicas, round robin, no concurrency cap below the load: the
    work vllm-router does with `--worker-urls ... --policy round_robin`."""
    return {
        "server": {"host": "127.0.0.1"},
        "routing": {"strategy": "round_robin", "max_concurrent_requests": cap},
        "accounting": {"enabled": accounting, "sqlite_path": str(data / "replicas.db")},
        "logging": {"audit_log": str(data / "replicas-audit.jsonl")},
        "models": {
            MODEL: {
                "max_concurrent": cap,
                "endpoints": [{"url": f"http://127.0.0.1:{port}"} for port in ports],
            }
        },
    }


def native_state(tree: Path) -> str:
    """Whether the gateway in `tree` runs its request path compiled (native.py)."""
    return subprocess.run(
        [sys.executable, "-c", "import native; print(native.state())"],
        cwd=tree,
        env=dict(os.environ, PYTHONPATH=str(tree)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def start(command: list[str], core: int | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        pinned(core, command), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def set_behaviours(urls: list[str], knobs: Mapping[str, float]) -> None:
    for url in urls:
        await set_behaviour(url, **knobs)


@dataclass
class Target:
    """One router's costs in one run: non-streamed requests under wrk, then paced streams,
    then short paced streams (SHORT_TOKENS tokens), which split a paced chunk's cost into what
    each stream costs once and what each further chunk costs."""

    name: str
    load: LoadResult
    request_cpu: float  # seconds per request
    paced: StreamResult
    short: StreamResult
    rounds: list[Target] = field(default_factory=list)  # what was combined, round by round

    @property
    def per_extra_chunk(self) -> float:
        long, short = self.paced, self.short
        extra = long.chunks / max(1, long.streams) - short.chunks / max(1, short.streams)
        return (long.per_stream - short.per_stream) / extra if extra > 0 else 0.0

    @property
    def per_stream_once(self) -> float:
        short = self.short
        return short.per_stream - self.per_extra_chunk * short.chunks / max(1, short.streams)


class Bench:
    """The run's settings and load generators, shared by every phase."""

    def __init__(self, args: argparse.Namespace, wrk: str | None, load_core: int | None):
        self.args = args
        self.wrk = wrk
        self.load_core = load_core
        self.paced_knobs = {"tokens": args.paced_tokens, "token_delay": args.token_delay / 1000}

    async def load(self, url: str) -> LoadResult:
        args = self.args
        if self.wrk:
            return run_wrk(self.wrk, url, args.connections, args.duration, self.load_core)
        return await python_load(url, args.connections, args.duration)

    async def request_cost(self, pid: int, url: str) -> tuple[LoadResult, float]:
        cpu_before = cpu_seconds(pid)
        result = await self.load(url)
        return result, (cpu_seconds(pid) - cpu_before) / max(1, result.requests)

    async def paced_cost(
        self, pid: int, url: str, backends: list[str], tokens: int | None = None
    ) -> StreamResult:
        knobs = self.paced_knobs if tokens is None else {**self.paced_knobs, "tokens": tokens}
        await set_behaviours(backends, knobs)
        try:
            cpu_before = cpu_seconds(pid)
            result = await paced_load(url, self.args.paced_streams, self.args.duration)
            result.cpu_seconds = cpu_seconds(pid) - cpu_before
        finally:
            await set_behaviours(backends, PLAIN)
        return result

    async def target(
        self, name: str, process: subprocess.Popen[bytes], url: str, backends: list[str]
    ) -> Target:
        load, request_cpu = await self.request_cost(process.pid, url)
        paced = await self.paced_cost(process.pid, url, backends)
        short = await self.paced_cost(process.pid, url, backends, SHORT_TOKENS)
        return Target(name, load, request_cpu, paced, short)


@dataclass
class ReplicaTarget:
    """How to start one router in replicas mode: its command and how to tell it is up."""

    name: str
    command: list[str]
    port: int
    ready: Callable[[str, subprocess.Popen[bytes]], Awaitable[None]]


async def replicas_mode(bench: Bench, gateway_core: int | None) -> list[Target]:
    """The gateway, the bare pass-through and (opt-in) vllm-router on one model served by
    `--replicas` simulators, on the same cores, in `--rounds` rounds, each target started
    afresh in every round and the order reversed every other round (A B C, C B A, ...), so
    that a host whose speed drifts during the run weighs on every target alike; each target's
    figures add its rounds up."""
    args = bench.args
    python = sys.executable
    ports = [free_port() for _ in range(args.replicas)]
    backends = [f"http://127.0.0.1:{port}" for port in ports]
    cap = max(1000, 2 * (args.paced_streams + args.connections))
    with tempfile.TemporaryDirectory(prefix="router-bench-replicas-") as tmp:
        data = Path(tmp)
        config_path = data / "replicas.yaml"
        config = replicas_config(ports, data, not args.no_accounting, cap)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        async def gateway_up(url: str, process: subprocess.Popen[bytes]) -> None:
            await wait_up(url.replace("/v1/chat/completions", "/health/live"), process)

        port = free_port()
        routers = [
            ReplicaTarget(
                "request-router",
                [python, "-m", "proxy", "--config", str(config_path), "--port", str(port)],
                port,
                gateway_up,
            )
        ]
        port = free_port()
        passthrough = [python, str(ROOT / "scripts" / "passthrough.py"), str(port), *backends]
        routers.append(ReplicaTarget("bare aiohttp pass-through", passthrough, port, wait_up_post))
        if args.compare_vllm_router and not args.vllm_router:
            print("vllm-router not found (pip install vllm-router): skipped", flush=True)
        elif args.compare_vllm_router:
            port = free_port()
            command = [args.vllm_router, "--host", "127.0.0.1", "--port", str(port)]
            command += ["--worker-urls", *backends, "--policy", "round_robin"]
            routers.append(ReplicaTarget("vllm-router", command, port, wait_up_post))

        rounds: dict[str, list[Target]] = {router.name: [] for router in routers}
        sims = start([python, "-m", "simulator", "--config", str(config_path)], bench.load_core)
        try:
            for backend in backends:
                await wait_up(f"{backend}/health", sims)
            for number in range(args.rounds):
                for router in routers if number % 2 == 0 else routers[::-1]:
                    process = start(router.command, gateway_core)
                    try:
                        url = f"http://127.0.0.1:{router.port}/v1/chat/completions"
                        await router.ready(url, process)
                        target = await bench.target(router.name, process, url, backends)
                        rounds[router.name].append(target)
                    finally:
                        stop(process)
        finally:
            stop(sims)
    return [combined(targets) for targets in rounds.values()]


def combined(rounds: list[Target]) -> Target:
    """One target's rounds added up: requests, streams, chunks and CPU summed (so the
    figures per request and per chunk weigh each round by its work); wrk's p50 and p99
    averaged over the rounds."""
    first = rounds[0]
    load = LoadResult(
        requests=sum(r.load.requests for r in rounds),
        seconds=sum(r.load.seconds for r in rounds),
        p50_ms=statistics.mean(r.load.p50_ms or 0.0 for r in rounds),
        p99_ms=statistics.mean(r.load.p99_ms or 0.0 for r in rounds),
        errors=sum(r.load.errors for r in rounds),
    )
    request_cpu = sum(r.request_cpu * r.load.requests for r in rounds) / max(1, load.requests)

    def streams(results: list[StreamResult]) -> StreamResult:
        return StreamResult(
            streams=sum(r.streams for r in results),
            chunks=sum(r.chunks for r in results),
            errors=sum(r.errors for r in results),
            durations_ms=[d for r in results for d in r.durations_ms],
            cpu_seconds=sum(r.cpu_seconds for r in results),
        )

    paced = streams([r.paced for r in rounds])
    short = streams([r.short for r in rounds])
    return Target(first.name, load, request_cpu, paced, short, rounds)


@dataclass
class RedisRun:
    """One gateway run of `--redis`: with the section on or off."""

    redis: bool
    load: LoadResult
    request_cpu: float  # seconds per request
    idle_cpu: float  # seconds of CPU per second, idle


async def redis_mode(bench: Bench, gateway_core: int | None) -> list[RedisRun]:
    """The same gateway with the redis: section off and on, alternately, twice."""
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server not found (Debian: apt-get install redis-server): skipped", flush=True)
        return []
    args = bench.args
    python = sys.executable
    names = ["mixtral-8x7b", "hermes-2", "openchat-3.5", "phi-3-mini"]
    names += ["qdrant-primary", "embedding-gpu0"]
    ports = {name: free_port() for name in names}
    redis_port = free_port()
    runs = []
    with tempfile.TemporaryDirectory(prefix="router-bench-redis-") as tmp:
        data = Path(tmp)
        config = config_for(ports, data, accounting=not args.no_accounting)
        # High enough never to refuse: the buckets are synced, the load is not limited.
        config["rate_limit"] = {"rps": 1_000_000}
        sims_config = data / "sims.yaml"
        sims_config.write_text(yaml.safe_dump(config, sort_keys=False))
        redis = start(
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no"],
            bench.load_core,
        )
        sims = start([python, "-m", "simulator", "--config", str(sims_config)], bench.load_core)
        try:
            await wait_up(f"http://127.0.0.1:{ports[MODEL]}/health", sims)
            for enabled in (False, True, False, True):
                config["redis"] = {"enabled": enabled, "url": f"redis://127.0.0.1:{redis_port}/0"}
                path = data / f"redis-{enabled}.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                port = free_port()
                gateway = start(
                    [python, "-m", "proxy", "--config", str(path), "--port", str(port)],
                    gateway_core,
                )
                try:
                    await wait_up(f"http://127.0.0.1:{port}/health/live", gateway)
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    await python_load(url, 10, 1.0)  # warm up connection pools
                    load, request_cpu = await bench.request_cost(gateway.pid, url)
                    before = cpu_seconds(gateway.pid)
                    await asyncio.sleep(IDLE_SECONDS)
                    idle = (cpu_seconds(gateway.pid) - before) / IDLE_SECONDS
                    runs.append(RedisRun(enabled, load, request_cpu, idle))
                finally:
                    stop(gateway)
        finally:
            stop(sims, redis)
    return runs


@dataclass
class WorkersRun:
    """One gateway run of `--workers`: with 1 or N worker processes."""

    workers: int
    load: LoadResult
    request_cpu: float  # seconds per request, every process of the gateway


async def workers_mode(bench: Bench, gateway_core: int | None) -> list[WorkersRun]:
    """The same gateway with one worker and with `--workers N`, alternately, twice."""
    args = bench.args
    python = sys.executable
    names = ["mixtral-8x7b", "hermes-2", "openchat-3.5", "phi-3-mini"]
    names += ["qdrant-primary", "embedding-gpu0"]
    ports = {name: free_port() for name in names}
    runs = []
    with tempfile.TemporaryDirectory(prefix="router-bench-workers-") as tmp:
        data = Path(tmp)
        config = config_for(ports, data, accounting=not args.no_accounting)
        path = data / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        sims = start([python, "-m", "simulator", "--config", str(path)], bench.load_core)
        try:
            await wait_up(f"http://127.0.0.1:{ports[MODEL]}/health", sims)
            for workers in (1, args.workers, 1, args.workers):
                port = free_port()
                command = [python, "-m", "proxy", "--config", str(path), "--port", str(port)]
                command += ["--workers", str(workers)]
                gateway = start(command, gateway_core if workers == 1 else None)
                try:
                    await wait_up(f"http://127.0.0.1:{port}/health/live", gateway)
                    await asyncio.sleep(1.0)  # every worker listening
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    await python_load(url, 10, 1.0)  # warm up connection pools
                    load, request_cpu = await bench.request_cost(gateway.pid, url)
                    runs.append(WorkersRun(workers, load, request_cpu))
                finally:
                    stop(gateway)
        finally:
            stop(sims)
    return runs


def print_workers(runs: list[WorkersRun], args: argparse.Namespace) -> None:
    print(
        f"\nworkers mode: 1 worker on core 0, then {args.workers} workers on every core (with"
        f" the load and the simulators), {args.connections} connections, twice each, one after"
        f" the other"
    )
    lines = [("workers", "req/s", "p50 / p99", "CPU/request")]
    for run in runs:
        lines.append(
            (
                str(run.workers),
                f"{run.load.rps:,.0f} ({run.load.errors} errors)",
                f"{run.load.p50_ms or 0:.2f} / {run.load.p99_ms or 0:.2f} ms",
                f"{run.request_cpu * 1e6:,.1f} µs",
            )
        )
    print_table(lines)
    one = [run for run in runs if run.workers == 1]
    many = [run for run in runs if run.workers != 1]
    if one and many:
        rps = ratio(
            statistics.mean(r.load.rps for r in many), statistics.mean(r.load.rps for r in one)
        )
        cpu = ratio(
            statistics.mean(r.request_cpu for r in many),
            statistics.mean(r.request_cpu for r in one),
        )
        print(
            f"{args.workers} workers / 1: requests/s {rps}, CPU per request {cpu}"
            f" (means of {len(one)} runs each)"
        )


def print_redis(runs: list[RedisRun], args: argparse.Namespace) -> None:
    print(
        f"\nredis mode: the gateway with the redis: section off and on (a local redis-server,"
        f" sync every 100 ms, a global limit that never refuses), {args.connections}"
        f" connections, off / on twice, one after the other"
    )
    header = ("redis", "req/s", "p50 / p99", "CPU/request", "idle CPU")
    lines = [header]
    for run in runs:
        lines.append(
            (
                "on" if run.redis else "off",
                f"{run.load.rps:,.0f} ({run.load.errors} errors)",
                f"{run.load.p50_ms or 0:.2f} / {run.load.p99_ms or 0:.2f} ms",
                f"{run.request_cpu * 1e6:,.1f} µs",
                f"{run.idle_cpu * 1000:.1f} ms/s",
            )
        )
    print_table(lines)
    on = [run.request_cpu for run in runs if run.redis]
    off = [run.request_cpu for run in runs if not run.redis]
    if on and off:
        print(
            f"redis on / off: CPU per request {ratio(statistics.mean(on), statistics.mean(off))}"
            f" (means of {len(on)} runs each)"
        )


def print_table(lines: Sequence[tuple[str, ...]]) -> None:
    """Rows of cells in left-aligned columns; the first row is the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs else "-"


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def print_replicas(targets: list[Target], args: argparse.Namespace) -> None:
    print(
        f"\nreplicas mode: {MODEL} on {args.replicas} simulators, round robin, no concurrency"
        f" cap below the load; {args.connections} connections (wrk) and {args.paced_streams}"
        f" paced streams; same run, {args.rounds} rounds of every target, the order reversed"
        " every other round; figures are the rounds added up"
    )
    header = (
        "target",
        "req/s",
        "p50 / p99",
        "CPU/request",
        "CPU/paced chunk",
        "CPU/stream",
        "stream once + per extra chunk",
    )
    lines = [header]
    for t in targets:
        lines.append(
            (
                t.name,
                f"{t.load.rps:,.0f} ({t.load.errors} errors)",
                f"{t.load.p50_ms or 0:.2f} / {t.load.p99_ms or 0:.2f} ms",
                f"{t.request_cpu * 1e6:,.1f} µs",
                f"{t.paced.per_chunk * 1e6:,.1f} µs ({t.paced.errors} errors)",
                f"{t.paced.per_stream * 1e6:,.0f} µs",
                f"{t.per_stream_once * 1e6:,.0f} + {t.per_extra_chunk * 1e6:,.1f} µs",
            )
        )
    print_table(lines)
    print(
        f"(the split: paced streams of {args.paced_tokens} and of {SHORT_TOKENS} tokens, the same"
        " delays; a stream's own request, head and end, then each further chunk)"
    )
    ours = targets[0]
    for other in targets[1:]:
        by_round = ", ".join(
            f"{ratio(a.request_cpu, b.request_cpu)} / {ratio(a.paced.per_chunk, b.paced.per_chunk)}"
            for a, b in zip(ours.rounds, other.rounds, strict=True)
        )
        pair = f"{ours.name} / {other.name}"
        print(f"{pair} round by round, per request / per paced chunk: {by_round}")
        print(
            f"{ours.name} / {other.name}: per request"
            f" {ratio(ours.request_cpu, other.request_cpu)}, per paced chunk"
            f" {ratio(ours.paced.per_chunk, other.paced.per_chunk)}, per paced stream"
            f" {ratio(ours.paced.per_stream, other.paced.per_stream)}; a stream once"
            f" {ratio(ours.per_stream_once, other.per_stream_once)}, per extra chunk"
            f" {ratio(ours.per_extra_chunk, other.per_extra_chunk)}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--streams", type=int, default=20, help="unpaced SSE streams")
    parser.add_argument("--tokens", type=int, default=200, help="SSE chunks per unpaced stream")
    parser.add_argument("--paced-streams", type=int, default=200, help="concurrent paced streams")
    parser.add_argument("--paced-tokens", type=int, default=32, help="tokens per paced stream")
    parser.add_argument("--token-delay", type=float, default=10.0, help="ms between paced tokens")
    parser.add_argument(
        "--replicas", type=int, default=0, help="also measure one model on N replicas (0: off)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="replicas mode: rounds of every target, the order reversed every other round",
    )
    parser.add_argument(
        "--compare-vllm-router",
        action="store_true",
        help="with --replicas: run vllm-router against the same replicas",
    )
    parser.add_argument(
        "--vllm-router",
        default=os.environ.get("VLLM_ROUTER") or shutil.which("vllm-router"),
        help="the vllm-router command (default: $VLLM_ROUTER, else on PATH)",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also measure the gateway with the redis: section on vs off (needs redis-server)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also measure the gateway with 1 worker against this many (0: off)",
    )
    parser.add_argument("--smoke", action="store_true", help="1 s phases, small samples")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="SQL accounting off (issue 6's conditions: queue, balancer, breakers, metrics)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.tokens, args.paced_streams = 1.0, 50, 50
    cores = os.cpu_count() or 1
    can_pin = not args.no_pin and cores >= 2 and shutil.which("taskset") is not None
    gateway_core, load_core = (0, 1) if can_pin else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})  # the Python load generators are this process
    bench = Bench(args, ensure_wrk(), load_core)

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
        config = config_for(ports, data, accounting=not args.no_accounting)
        # The paced streams must not queue behind a concurrency cap: that would measure the
        # queue, not the relay.
        cap = max(100, args.paced_streams + args.connections)
        config["routing"] = {"max_concurrent_requests": cap}
        config["models"][MODEL]["max_concurrent"] = cap
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        python = sys.executable
        sims = start([python, "-m", "simulator", "--config", str(config_path)], load_core)
        gateway = start(
            [python, "-m", "proxy", "--config", str(config_path), "--port", str(gateway_port)],
            gateway_core,
        )
        try:
            direct = f"http://127.0.0.1:{ports[MODEL]}"
            base = f"http://127.0.0.1:{gateway_port}"
            await wait_up(f"{direct}/health", sims)
            await wait_up(f"{base}/health/live", gateway)
            chat_direct = f"{direct}/v1/chat/completions"
            chat_gateway = f"{base}/v1/chat/completions"
            idle_rss = rss_mb(gateway.pid)

            await bench.load(chat_gateway) if args.smoke else None  # warm up connection pools
            ceiling = await bench.load(chat_direct)
            through, cpu_request = await bench.request_cost(gateway.pid, chat_gateway)

            await set_behaviour(direct, tokens=args.tokens, token_delay=0)
            cpu_before = cpu_seconds(gateway.pid)
            _, events = await stream_load(chat_gateway, args.streams, args.duration)
            cpu_chunk = (cpu_seconds(gateway.pid) - cpu_before) / max(1, events)
            await set_behaviour(direct, **PLAIN)

            paced = await bench.paced_cost(gateway.pid, chat_gateway, [direct])

            samples = 50 if args.smoke else 300
            ttfb_direct = await ttfb_ms(chat_direct, samples)
            ttfb_gateway = await ttfb_ms(chat_gateway, samples)

            bare_port = free_port()
            bare_process = start(
                [python, str(ROOT / "scripts" / "passthrough.py"), str(bare_port), direct],
                gateway_core,
            )
            try:
                bare_url = f"http://127.0.0.1:{bare_port}/v1/chat/completions"
                await wait_up_post(bare_url, bare_process)
                bare = await bench.target("bare", bare_process, bare_url, [direct])
            finally:
                stop(bare_process)

            before_hold = rss_mb(gateway.pid)
            held = await hold_connections(base, 1000)
            await asyncio.sleep(0.5)
            per_thousand = rss_mb(gateway.pid) - before_hold
            for writer in held:
                writer.close()
        finally:
            stop(gateway, sims)

    replicas = await replicas_mode(bench, gateway_core) if args.replicas else []
    redis_runs = await redis_mode(bench, gateway_core) if args.redis else []
    workers_runs = await workers_mode(bench, gateway_core) if args.workers > 1 else []

    generator = "wrk" if bench.wrk else "python"
    pinning = "unpinned" if gateway_core is None else "gateway on core 0, load + backends on core 1"
    chunks_each = args.paced_tokens + 2  # the tokens, the finish chunk and [DONE]
    print()
    print_rows(
        [
            ("load generator", f"{generator}, {args.connections} connections, {pinning}"),
            (
                "request path",
                "queue, balancer, breakers, metrics"
                + ("" if args.no_accounting else ", SQLite accounting")
                + f"; {native_state(ROOT)}",
            ),
            ("direct ceiling (one simulator)", f"{ceiling.rps:,.0f} req/s"),
            ("gateway requests/s", f"{through.rps:,.0f} req/s ({through.errors} errors)"),
            ("ratio to direct ceiling", ratio(through.rps, ceiling.rps)),
            (
                "gateway latency p50 / p99",
                f"{through.p50_ms or 0:.2f} ms / {through.p99_ms or 0:.2f} ms",
            ),
            ("gateway CPU per request", f"{cpu_request * 1e6:,.1f} µs"),
            (
                "bare aiohttp pass-through (same run)",
                f"{bare.load.rps:,.0f} req/s, {bare.request_cpu * 1e6:,.1f} µs CPU per request",
            ),
            (
                "gateway CPU per SSE chunk, unpaced (coalesced)",
                f"{cpu_chunk * 1e6:,.1f} µs ({events:,} chunks, {args.streams} streams of"
                f" {args.tokens} tokens, no delay)",
            ),
            (
                "paced streams",
                f"{args.paced_streams} concurrent, {args.paced_tokens} tokens"
                f" {args.token_delay:g} ms apart ({chunks_each} SSE chunks each)",
            ),
            (
                "gateway CPU per paced SSE chunk",
                f"{paced.per_chunk * 1e6:,.1f} µs ({paced.chunks:,} chunks,"
                f" {paced.streams:,} streams, {paced.errors} errors,"
                f" stream p50 {paced.p50_ms:.0f} ms)",
            ),
            ("gateway CPU per paced stream", f"{paced.per_stream * 1e6:,.0f} µs"),
            (
                "bare pass-through CPU per paced chunk",
                f"{bare.paced.per_chunk * 1e6:,.1f} µs ({bare.paced.chunks:,} chunks,"
                f" {bare.paced.errors} errors, stream p50 {bare.paced.p50_ms:.0f} ms),"
                f" {bare.paced.per_stream * 1e6:,.0f} µs per stream",
            ),
            (
                "ratio gateway / bare",
                f"per request {ratio(cpu_request, bare.request_cpu)}, per paced chunk"
                f" {ratio(paced.per_chunk, bare.paced.per_chunk)}, per paced stream"
                f" {ratio(paced.per_stream, bare.paced.per_stream)}",
            ),
            ("TTFB p50 direct / gateway", f"{ttfb_direct:.3f} ms / {ttfb_gateway:.3f} ms"),
            ("added TTFB p50", f"{ttfb_gateway - ttfb_direct:.3f} ms"),
            ("RSS idle", f"{idle_rss:.1f} MB"),
            ("RSS per 1,000 idle keep-alive connections", f"{per_thousand:.1f} MB"),
        ]
    )
    if replicas:
        print_replicas(replicas, args)
    if redis_runs:
        print_redis(redis_runs, args)
    if workers_runs:
        print_workers(workers_runs, args)


if __name__ == "__main__":
    uvloop.run(main())
