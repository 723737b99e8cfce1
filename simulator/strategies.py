"""Strategy simulator: replay a synthetic workload through the real strategy code on a virtual
clock, and compare strategies side by side.

    request-router simulate --strategies round_robin,latency,cost_optimized --requests 20000

    from simulator.strategies import simulate
    results = simulate(["latency", "round_robin"], requests=5000, seed=7)

The backends are the real `Upstream` objects (breakers, peak-EWMA latency, outcome rings) with
the virtual clock injected, in a real `Pool` with the real balancer; only the backends' service
times and failures are drawn from a model: a base latency per model, slower under load and for
longer answers, a failure rate, and one backend that degrades midway (slower and failing more).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from balancers.registry import strategy_names
from balancers.request import RoutingRequest, StrategySettings
from circuit.breaker import CircuitBreaker
from health.stats import LatencyRing, PeakEwma
from proxy.upstream import Pool, Upstream


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base_latency: float  # seconds for a typical answer on an idle backend
    cost: float
    quality: float
    failure_rate: float
    max_concurrent: int
    priority: int
    specializations: tuple[str, ...]


DEFAULT_MODELS = (
    ModelSpec("mixtral-8x7b", 1.2, 0.0027, 0.9, 0.01, 10, 1, ("general", "coding", "analysis")),
    ModelSpec("hermes-2", 0.8, 0.0018, 0.8, 0.01, 20, 2, ("conversation", "chat", "dialogue")),
    ModelSpec(
        "openchat-3.5", 0.6, 0.0012, 0.75, 0.02, 50, 3, ("interactive", "real-time", "streaming")
    ),
    ModelSpec("phi-3-mini", 0.3, 0.0004, 0.6, 0.02, 100, 4, ("efficient", "fast", "lightweight")),
)
WORKLOAD = (  # (share, request content, relative answer length)
    (0.3, "Hello! How are you today?", 0.5),
    (0.25, "Write a Python function that merges two sorted lists", 1.5),
    (0.2, "Analyze the trade-offs between SQL and NoSQL databases", 2.0),
    (0.15, "2+2?", 0.2),
    (0.1, "Tell me about the history of the printing press in Europe", 1.2),
)


@dataclass
class StrategyResult:
    strategy: str
    requests: int = 0
    succeeded: int = 0
    rejected: int = 0
    cost: float = 0.0
    latencies: LatencyRing = field(default_factory=LatencyRing)
    distribution: Counter[str] = field(default_factory=Counter)
    hit_degraded: int = 0

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.requests if self.requests else 0.0

    def row(self) -> dict[str, object]:
        total = sum(self.distribution.values()) or 1
        return {
            "strategy": self.strategy,
            "mean_ms": round(self.latencies.mean() * 1000, 1),
            "p95_ms": round(self.latencies.percentile(0.95) * 1000, 1),
            "p99_ms": round(self.latencies.percentile(0.99) * 1000, 1),
            "cost": round(self.cost, 4),
            "success_rate": round(self.success_rate, 4),
            "hit_degraded": self.hit_degraded,
            "distribution": {m: round(n / total * 100, 1) for m, n in self.distribution.items()},
        }


def _backends(models: Sequence[ModelSpec], clock: VirtualClock) -> list[Upstream]:
    backends = []
    for index, spec in enumerate(models):
        upstream = Upstream(
            spec.name,
            f"http://sim.invalid:{index}",
            spec.name,
            model=spec.name,
            max_concurrent=spec.max_concurrent,
            breaker=CircuitBreaker(5, 10.0, 3, clock=clock),
        )
        upstream.cost = spec.cost
        upstream.quality = spec.quality
        upstream.priority = spec.priority
        upstream.specializations = frozenset(spec.specializations)
        upstream.latency = PeakEwma(clock=clock)
        backends.append(upstream)
    return backends


def run_strategy(
    strategy: str,
    requests: int,
    seed: int = 1,
    rate: float = 40.0,
    models: Sequence[ModelSpec] = DEFAULT_MODELS,
    degraded: str = "hermes-2",
    progress: bool = False,
) -> StrategyResult:
    """One strategy over the workload. Same seed, same arrivals and draws for every strategy."""
    clock = VirtualClock()
    draws = random.Random(seed)
    backends = _backends(models, clock)
    specs = {spec.name: spec for spec in models}
    settings = StrategySettings(clock=clock)
    pool = Pool("auto", backends, strategy, rng=random.Random(seed), settings=settings)
    result = StrategyResult(strategy)
    degrade_at = requests / rate / 2  # virtual seconds: halfway through the arrivals
    shares = [share for share, _, _ in WORKLOAD]
    events: list[tuple[float, int, Upstream, float, bool]] = []  # (time, seq, backend, ...)
    arrival = 0.0
    sequence = 0
    bar = tqdm(total=requests, desc=strategy, disable=not progress, leave=False, file=sys.stderr)

    def finish_until(moment: float) -> None:
        while events and events[0][0] <= moment:
            finished_at, _, backend, latency, failed = heapq.heappop(events)
            clock.now = finished_at
            backend.active -= 1
            backend.latency.observe(latency)
            backend.latencies.add(latency)
            backend.outcomes.add(not failed)
            if failed:
                backend.breaker.record_failure()
            else:
                backend.breaker.record_success()
                result.succeeded += 1
                result.cost += backend.cost
                result.latencies.add(latency)

    for _ in range(requests):
        arrival += draws.expovariate(rate)
        finish_until(arrival)
        clock.now = arrival
        _, content, length = WORKLOAD[draws.choices(range(len(WORKLOAD)), shares)[0]]
        request = RoutingRequest(content=content, affinity_key=f"user-{draws.randrange(50)}")
        result.requests += 1
        bar.update()
        backend = pool.select((), request)
        if backend is None:
            result.rejected += 1
            continue
        backend.breaker.on_dispatch()
        backend.active += 1
        result.distribution[backend.name] += 1
        spec = specs[backend.name]
        slow = 1.0
        failure_rate = spec.failure_rate
        if backend.name == degraded and arrival >= degrade_at:
            result.hit_degraded += 1
            slow, failure_rate = 4.0, 0.3
        load = backend.active / backend.max_concurrent
        latency = spec.base_latency * length * slow * (1 + load) * draws.uniform(0.8, 1.2)
        failed = draws.random() < failure_rate
        sequence += 1
        heapq.heappush(events, (arrival + latency, sequence, backend, latency, failed))
    finish_until(float("inf"))
    bar.close()
    return result


def simulate(
    strategies: Sequence[str],
    requests: int = 10_000,
    seed: int = 1,
    rate: float = 40.0,
    progress: bool = False,
) -> list[StrategyResult]:
    return [
        run_strategy(strategy, requests, seed=seed, rate=rate, progress=progress)
        for strategy in strategies
    ]


def table(results: Sequence[StrategyResult]) -> str:
    headers = [
        "strategy",
        "mean ms",
        "p95 ms",
        "p99 ms",
        "cost",
        "success",
        "degraded hits",
        "distribution %",
    ]
    lines = []
    for result in results:
        row = result.row()
        distribution = " ".join(
            f"{name.split('-')[0]}:{share:g}"
            for name, share in sorted(row["distribution"].items())  # type: ignore[attr-defined]
        )
        lines.append(
            [
                str(row["strategy"]),
                f"{row['mean_ms']:g}",
                f"{row['p95_ms']:g}",
                f"{row['p99_ms']:g}",
                f"{row['cost']:g}",
                f"{float(row['success_rate']):.1%}",  # type: ignore[arg-type]
                str(row["hit_degraded"]),
                distribution,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    render = [" ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    render += [" ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(render)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="request-router simulate",
        description="Compare routing strategies on a synthetic workload (virtual clock).",
    )
    parser.add_argument(
        "--strategies",
        default="round_robin,latency,adaptive,cost_optimized,specialization,prefix_affinity",
        help="comma-separated strategy names",
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=40.0, help="arrivals per virtual second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    if not args.rate > 0:
        parser.error(f"--rate must be above 0, got {args.rate:g}")
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    if not strategies:
        parser.error(f"--strategies names none; valid: {', '.join(strategy_names())}")
    unknown = [name for name in strategies if name not in strategy_names()]
    if unknown:
        print(
            f"unknown strategies: {', '.join(unknown)}; valid: {', '.join(strategy_names())}",
            file=sys.stderr,
        )
        return 2
    results = simulate(
        strategies, args.requests, args.seed, args.rate, progress=sys.stderr.isatty()
    )
    print(
        f"{args.requests} requests at {args.rate:g}/s (virtual), hermes-2 degrades halfway "
        f"(4x slower, 30% failures); seed {args.seed}\n"
    )
    print(table(results))
    return 0
