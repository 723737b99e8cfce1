"""The gateway as operators run it: the console entry point in its own process, on uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import ROOT, gateway_process


async def test_gateway_process_serves_and_stops_on_sigterm(cluster: Cluster, tmp_path) -> None:
    env = {"ROUTER_STRATEGY": "weighted"}
    async with gateway_process(config_document(cluster), tmp_path, env) as gateway:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
                assert (await response.json())["strategy"] == "weighted"
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
                assert response.status == 200
                assert response.headers["x-router-backend"] == "mixtral-8x7b"
            async with http.get(f"{gateway.url}/health/ready") as response:
                assert response.status == 200
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 10) == 0
        output = await gateway.output()
    assert "listening on http://127.0.0.1:" in output and "event loop uvloop" in output
    assert "draining" in output and "Traceback" not in output


async def check_config(
    config: Path | str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`request-router --config CONFIG --check-config` as the unit's ExecStartPre runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        "--check-config",
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_validates_without_binding_or_notifying(tmp_path: Path) -> None:
    """ExecStartPre runs while the previous gateway may still hold the port, and with
    $NOTIFY_SOCKET set: the check must neither bind nor tell systemd it is ready."""
    with socket.socket() as holder, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        holder.setblocking(False)
        port = holder.getsockname()[1]
        notify.bind(str(tmp_path / "notify.sock"))
        notify.setblocking(False)
        config = tmp_path / "router.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"host": "127.0.0.1", "port": port},
                    "models": {"m": {"url": "http://127.0.0.1:9"}},
                }
            )
        )
        code, out, err = await check_config(
            config, tmp_path, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        )
        assert (code, err) == (0, "")
        assert f"listen: 127.0.0.1:{port}" in out and out.endswith("configuration OK\n")
        with pytest.raises(BlockingIOError):
            holder.accept()  # nobody connected to it either
        with pytest.raises(BlockingIOError):
            notify.recv(4096)
    assert not (tmp_path / "data").exists()  # nor created the database or the audit log


BAD_CONFIGS = {
    # file content (or None: no file), environment -> what the message must name
    "unknown key": ("server:\n  prot: 8000\n", {}, "server.prot: unknown key (value 8000)"),
    "bad value": (
        "routing:\n  strategy: fastest\n",
        {},
        "routing.strategy: unknown strategy 'fastest' (valid: round_robin,",
    ),
    "yaml syntax": ("routing:\n  strategy: [round_robin\n", {}, "YAML syntax error at line"),
    "missing file": (None, {}, "missing_file.yaml: cannot read config file (No such file"),
    "environment file": ("", {"ROUTER_PORT": "99999"}, "server.port: must be <= 65535, got 99999"),
    "unwritable file": (
        "logging:\n  access_log: /nonexistent/request-router/access.log\n",
        {},
        "logging.access_log: cannot create or write '/nonexistent/request-router/access.log'",
    ),
}


async def test_check_config_names_what_is_wrong_and_exits_2(tmp_path: Path) -> None:
    async def check(name: str, text: str | None, env: dict[str, str]) -> tuple[int, str, str]:
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        if text is not None:
            path.write_text(text)
        return await check_config(path, tmp_path, env)

    results = await asyncio.gather(
        *(check(name, text, env) for name, (text, env, _) in BAD_CONFIGS.items())
    )
    for (name, (_, _, expected)), (code, out, err) in zip(
        BAD_CONFIGS.items(), results, strict=True
    ):
        assert code == 2, name
        assert out == "", name  # no summary, no "configuration OK"
        assert err.startswith("request-router: invalid configuration: ") and expected in err, (
            name,
            err,
        )
        assert "Traceback" not in err, name


async def test_json_application_log_at_the_level_asked_for(cluster: Cluster, tmp_path) -> None:
    """ROUTER_LOG_FORMAT=json: every line of the application log is one JSON object; at
    ROUTER_LOG_LEVEL=warning the start-up's info lines are gone, a backend failure's error
    line stays."""
    env = {"ROUTER_LOG_FORMAT": "json", "ROUTER_LOG_LEVEL": "warning"}
    cluster["hermes-2"].behaviour.status = 503
    document = config_document(cluster, retry={"max_retries": 0})
    async with gateway_process(document, tmp_path, env) as gateway:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
                assert r.status == 503
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 10) == 0
        output = await gateway.output()
    records = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    assert records, output
    assert all(set(r) >= {"time", "level", "logger", "message", "pid"} for r in records)
    assert {r["level"] for r in records} <= {"warning", "error"}
    assert not any("listening on" in r["message"] for r in records)
    failure = next(r for r in records if r["message"].startswith("backend hermes-2 failed"))
    assert failure["level"] == "error" and failure["time"].endswith("Z")
