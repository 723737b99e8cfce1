#!/usr/bin/env python3
"""Soak: mixed traffic with periodic faults for minutes (or hours), and the gateway's memory,
file descriptors and tasks sampled throughout: they must stay flat.

    python scripts/soak.py                  # 3 minutes
    python scripts/soak.py --minutes 240    # an operator's soak

The setup is the chaos suite's (scripts/chaos.py): simulated backends in this process, the
gateway in its own (build_app + make_runner on uvloop, with GET /_chaos/tasks counting its
asyncio tasks), accounting on in SQLite, the same traffic mix from --concurrency clients. Every
--fault-every seconds the next fault of the chaos schedule (kill, 503 storm, 429 storm, stall,
port flap, stale keep-alive) is on for --fault-for seconds; none in the last --fault-every
seconds, so the run ends recovered.

Every --interval seconds the gateway process's RSS (/proc/<pid>/status), open fds
(/proc/<pid>/fd) and asyncio tasks are sampled. At the end it prints the RSS slope (MB/hour,
least squares over the second half of the samples: the first half holds the warm-up, when
connection pools, statistics rings and caches fill), and fds and tasks at rest (no traffic, idle
upstream connections expired) before and after. Exit 1 when the slope exceeds --max-rss-slope,
or fds or tasks at rest grew by more than --max-fd-growth / --max-task-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import chaos


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the traffic started
    rss_mb: float
    fds: int
    tasks: int
    requests: int  # answers so far


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600


class Tally:
    """Answers per traffic class, counted rather than kept: a soak sends millions."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.abandoned = 0
        self.total = 0

    def __call__(self, result: chaos.Result) -> None:
        self.total += 1
        if result.abandoned:
            self.abandoned += 1
            return
        self.sent[result.label] += 1
        self.ok[result.label] += result.ok


async def at_rest(gateway: chaos.Gateway, seconds: float) -> tuple[int, int]:
    """fds and tasks once the traffic has stopped and idle connections expired: the lowest
    seen over `seconds` (a health probe may hold a connection for a moment)."""
    fds, tasks = len(gateway.fds()), await gateway.tasks()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.25)
        fds, tasks = min(fds, len(gateway.fds())), min(tasks, await gateway.tasks())
    return fds, tasks


async def soak(args: argparse.Namespace) -> int:
    timers = chaos.FULL_TIMERS
    duration = args.minutes * 60
    print(
        f"soak: {args.minutes:g} min from {args.concurrency} clients; a fault every"
        f" {args.fault_every:g} s for {args.fault_for:g} s; samples every {args.interval:g} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="router-soak-") as tmp:
        data = Path(tmp)
        cluster = await chaos.start_cluster()
        try:
            document = chaos.gateway_config(cluster, timers, data, chaos.free_port())
            gateway = await chaos.start_gateway(document, data)
            try:
                return await run(args, cluster, gateway, timers, duration)
            finally:
                await chaos.stop_gateway(gateway)
        finally:
            await cluster.stop()


async def run(
    args: argparse.Namespace,
    cluster: chaos.Cluster,
    gateway: chaos.Gateway,
    timers: chaos.Timers,
    duration: float,
) -> int:
    idle_expiry = 2.0  # chaos.gateway_config's keepalive_timeout (1 s), then the sweep
    await asyncio.sleep(timers.health_interval * 3)
    rest_before = await at_rest(gateway, 1.0)
    started = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - started

    tally = Tally()
    traffic = chaos.Traffic(gateway.url, args.concurrency, args.seed, clock, record=tally)
    samples: list[Sample] = []
    faults_run: Counter[str] = Counter()

    async def sample() -> None:
        next_report = 0.0
        while not traffic.stopping:
            point = Sample(
                clock(), gateway.rss_mb(), len(gateway.fds()), await gateway.tasks(), tally.total
            )
            samples.append(point)
            if point.t >= next_report:
                print(
                    f"{point.t / 60:6.1f} min  RSS {point.rss_mb:6.1f} MB  fds {point.fds:4d}"
                    f"  tasks {point.tasks:4d}  {point.requests:9,d} requests",
                    flush=True,
                )
                next_report += args.report
            await asyncio.sleep(args.interval)

    async def faults() -> None:
        index = 0
        while clock() + args.fault_every < duration:
            await asyncio.sleep(args.fault_every - args.fault_for)
            schedule = chaos.schedule()
            fault = schedule[index % len(schedule)]
            index += 1
            await fault.begin(cluster)
            faults_run[fault.name] += 1
            await asyncio.sleep(args.fault_for)
            await fault.finish(cluster)
        await asyncio.sleep(max(0.0, duration - clock()))
        traffic.stopping = True

    await asyncio.gather(traffic.run(), sample(), faults())
    await asyncio.sleep(idle_expiry)
    rest_after = await at_rest(gateway, 2.0)
    return report(args, tally, samples, faults_run, rest_before, rest_after)


def report(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[Sample],
    faults_run: Counter[str],
    rest_before: tuple[int, int],
    rest_after: tuple[int, int],
) -> int:
    second_half = samples[len(samples) // 2 :]
    slope = slope_per_hour([(s.t, s.rss_mb) for s in second_half])
    elapsed = samples[-1].t if samples else 0.0
    print()
    print(
        f"{tally.total:,} requests in {elapsed / 60:.1f} min"
        f" ({tally.total / max(elapsed, 1):.0f}/s),"
        f" {tally.abandoned:,} streams left by their clients; faults: "
        + ", ".join(f"{name} x{count}" for name, count in faults_run.items())
    )
    print(
        "success (all phases, faults included): "
        + ", ".join(
            f"{label} {tally.ok[label] / tally.sent[label] * 100:.1f}%"
            for label in chaos.CLASSES
            if tally.sent[label]
        )
    )
    if samples:
        first, last = samples[0], samples[-1]
        peak = max(s.rss_mb for s in samples)
        print(
            f"RSS: {first.rss_mb:.1f} MB at start, {last.rss_mb:.1f} MB at end, peak"
            f" {peak:.1f} MB; slope over the second half ({len(second_half)} samples):"
            f" {slope:+.1f} MB/hour (limit {args.max_rss_slope:g})"
        )
        print(
            f"under traffic: fds {first.fds} -> {last.fds} (max {max(s.fds for s in samples)}),"
            f" tasks {first.tasks} -> {last.tasks} (max {max(s.tasks for s in samples)})"
        )
    fd_growth = rest_after[0] - rest_before[0]
    task_growth = rest_after[1] - rest_before[1]
    print(
        f"at rest: fds {rest_before[0]} before, {rest_after[0]} after ({fd_growth:+d}, limit"
        f" {args.max_fd_growth}); tasks {rest_before[1]} before, {rest_after[1]} after"
        f" ({task_growth:+d}, limit {args.max_task_growth})"
    )
    failures = []
    if slope > args.max_rss_slope:
        failures.append(f"RSS slope {slope:+.1f} MB/hour > {args.max_rss_slope:g}")
    if fd_growth > args.max_fd_growth:
        failures.append(f"fds grew by {fd_growth}")
    if task_growth > args.max_task_growth:
        failures.append(f"tasks grew by {task_growth}")
    print("soak: " + ("PASSED" if not failures else "FAILED: " + "; ".join(failures)), flush=True)
    return 1 if failures else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=3.0, help="length of the soak")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--report", type=float, default=30.0, help="seconds between printed lines")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--fault-for", type=float, default=5.0, help="seconds each fault lasts")
    parser.add_argument("--seed", type=int, default=11, help="order of the traffic mix")
    parser.add_argument(
        "--max-rss-slope", type=float, default=30.0, help="MB/hour over the second half"
    )
    parser.add_argument("--max-fd-growth", type=int, default=0, help="fds at rest, after - before")
    parser.add_argument("--max-task-growth", type=int, default=0, help="tasks at rest, growth")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.fault_for < args.fault_every:
        raise SystemExit("--fault-for must be shorter than --fault-every")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
