"""The strategy simulator: real strategy code on a virtual clock, reproducible by seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from simulator.strategies import DEFAULT_MODELS, simulate, table

ROOT = Path(__file__).resolve().parent.parent


def test_same_seed_same_result() -> None:
    first = simulate(["round_robin", "latency"], requests=2000, seed=5)
    second = simulate(["round_robin", "latency"], requests=2000, seed=5)
    assert [r.row() for r in first] == [r.row() for r in second]


def test_strategies_differ_as_they_should() -> None:
    results = {
        r.strategy: r
        for r in simulate(
            ["round_robin", "latency", "cost_optimized", "quality_optimized"], requests=4000, seed=2
        )
    }
    # Latency-aware routing notices the degraded backend and sends it less.
    assert results["latency"].hit_degraded < results["round_robin"].hit_degraded / 2
    # Cost-optimized is the cheapest; quality-optimized fills the best models first (mixtral
    # and hermes are full much of the time at this rate) and leaves the weakest one idle.
    assert results["cost_optimized"].cost == min(r.cost for r in results.values())
    quality = results["quality_optimized"].distribution
    assert quality["phi-3-mini"] < 0.02 * 4000 < results["round_robin"].distribution["phi-3-mini"]
    traits = {spec.name: spec.quality for spec in DEFAULT_MODELS}

    def served_quality(strategy: str) -> float:
        distribution = results[strategy].distribution
        return sum(traits[m] * n for m, n in distribution.items()) / sum(distribution.values())

    assert served_quality("quality_optimized") > served_quality("round_robin")
    assert served_quality("quality_optimized") > served_quality("cost_optimized")
    assert all(r.requests == 4000 for r in results.values())
    rendered = table(list(results.values()))
    assert rendered.splitlines()[0].startswith("strategy") and "degraded hits" in rendered


def test_cli() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "simulate",
            "--strategies",
            "round_robin,specialization",
            "--requests",
            "500",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "round_robin" in result.stdout and "specialization" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "simulate", "--strategies", "telepathy"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "telepathy" in bad.stderr
