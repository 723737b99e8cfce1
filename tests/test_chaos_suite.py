"""scripts/chaos.py --short: the chaos suite in CI's form (issue 11, "a suite that stays").

Every fault of the schedule (a model killed and restarted, a 503 storm, a 429 storm, streams
stalling, a port flapping, stale keep-alive connections) on faster timers, through a gateway in
its own process; the script's invariants must all hold. Its timeline is printed (`pytest -s`).
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "chaos.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
async def test_short_chaos_run_keeps_every_invariant() -> None:
    chaos = load_script()
    out = io.StringIO()
    outcome = await chaos.run(chaos.parse_args(["--short"]), out)
    print(out.getvalue())
    failed = [f"{check.name}: {check.detail}" for check in outcome.checks if not check.passed]
    assert not failed, "\n".join(failed)
    names = {check.name for check in outcome.checks}
    for fault in ("kill", "503 storm", "429 storm", "stall", "port flap", "stale keep-alive"):
        assert any(name.startswith(f"{fault}: ") and "serves again" in name for name in names)
        assert f"{fault}: clear >= 99.9%" in names
    for invariant in (
        "in_flight and queued 0",
        "fds back to baseline",
        "tasks back to baseline",
        "accounting rows = requests",
    ):
        assert invariant in names
    assert len(outcome.results) > 1000
