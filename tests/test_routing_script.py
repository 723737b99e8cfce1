"""scripts/test_routing.sh against a live gateway: the walk-through operators run."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.conftest import config_document

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test_routing.sh"


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq (.ci/run installs)"
)
async def test_walk_through_passes_against_a_running_gateway(cluster, start_gateway) -> None:
    gateway = await start_gateway(config_document(cluster, chaos={"enabled": True}))
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(SCRIPT),
        gateway.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 50))[0].decode()
    assert process.returncode == 0, output
    assert "request 10 -> " in output and "all steps passed" in output
    assert '"new_state":"open"' in output and '"requests_lost":0' in output
    assert gateway.router.strategy == "round_robin"  # restored at the end


async def test_walk_through_fails_when_the_gateway_is_down() -> None:
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(SCRIPT),
        "http://127.0.0.1:9",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
    assert process.returncode != 0 and "FAIL" in output
