"""The systemd unit matches the gateway's signal semantics and passes systemd's own check."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config.schema import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "request-router.service"
INSTALLED_BINARY = "/opt/request-router/.venv/bin/request-router"


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_unit_matches_signal_semantics() -> None:
    service = service_section()
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > ServerConfig().shutdown_grace
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["User"] not in ("", "root")
    assert service["EnvironmentFile"].lstrip("-") == "/etc/request-router/request-router.env"
    assert "--config /etc/request-router/router_config.yaml" in service["ExecStart"]
    assert (ROOT / "deploy" / "request-router.env").read_text().count("ROUTER_") >= 10


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = Path(sys.executable).with_name("request-router")
    assert binary.exists(), "the package's console script should be installed"
    unit = tmp_path / "request-router.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    broken = tmp_path / "broken.service"
    broken.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(tmp_path / "missing")))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0  # the check really looks at the unit
