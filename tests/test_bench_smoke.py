"""scripts/bench.py --smoke: keeps the benchmark working (figures are printed, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_benchmark_smoke_run_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=220,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in (
        "gateway requests/s",
        "gateway CPU per request",
        "gateway CPU per SSE chunk",
        "bare aiohttp pass-through",
        "added TTFB p50",
        "RSS idle",
    ):
        assert row in result.stdout, row
    assert "(0 errors)" in result.stdout
