"""scripts/bench.py --smoke: keeps the benchmark working (figures are printed, not asserted)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_benchmark_smoke_run_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--smoke", "--replicas", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=220,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in (
        "gateway requests/s",
        "gateway CPU per request",
        "gateway CPU per SSE chunk, unpaced (coalesced)",
        "gateway CPU per paced SSE chunk",
        "bare pass-through CPU per paced chunk",
        "ratio gateway / bare",
        "bare aiohttp pass-through",
        "added TTFB p50",
        "RSS idle",
        "replicas mode: phi-3-mini on 2 simulators",
        "request-router / bare aiohttp pass-through: per request",
        "stream once + per extra chunk",
    ):
        assert row in result.stdout, row
    # Every request and stream of every phase and target was answered.
    errors = re.findall(r"(\d+) errors", result.stdout)
    assert len(errors) >= 6 and set(errors) == {"0"}, errors


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="scripts/icount.py needs valgrind")
def test_instruction_count_run_prints_every_phase() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/icount.py", "--n", "20", "--warm", "10", "--paced-tokens", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=220,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for phase, unit in (("plain", "request"), ("fallback", "request"), ("paced", "chunk")):
        assert re.search(rf"{phase} +[\d,]+ per {unit}", result.stdout), result.stdout
    assert re.search(r"paced, idle work taken out: -?[\d,]+ per chunk more", result.stdout)
