#!/usr/bin/env python3
"""Micro-benchmark: time per routing decision for every strategy, on the real Pool and
Upstream objects, with a typical chat request. Prints one line per strategy.

    python scripts/bench_decisions.py [--decisions 50000] [--backends 4]
"""

from __future__ import annotations

import argparse
import random
import time

from balancers.registry import strategy_names
from balancers.request import RoutingRequest
from proxy.upstream import Pool
from simulator.strategies import DEFAULT_MODELS, VirtualClock, _backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--backends", type=int, default=4, help="a multiple of 4")
    args = parser.parse_args()
    models = [spec for _ in range(max(1, args.backends // 4)) for spec in DEFAULT_MODELS]
    request = RoutingRequest(
        content="Write a Python function that merges two sorted lists, with tests",
        affinity_key="user-17",
    )
    print(f"{args.decisions:,} decisions per strategy over {len(models)} backends")
    for strategy in strategy_names():
        backends = _backends(models, VirtualClock())
        rng = random.Random(1)
        for backend in backends:  # some history, as in a running gateway
            for _ in range(20):
                backend.latency.observe(rng.uniform(0.05, 0.5))
                backend.latencies.add(rng.uniform(0.05, 0.5))
                backend.outcomes.add(rng.random() > 0.02)
            backend.active = rng.randrange(3)
        pool = Pool("auto", backends, strategy, rng=random.Random(2))
        select = pool.select
        started = time.perf_counter()
        for _ in range(args.decisions):
            select((), request)
        per_decision = (time.perf_counter() - started) / args.decisions
        print(f"  {strategy:<22} {per_decision * 1e6:7.2f} µs")


if __name__ == "__main__":
    main()
