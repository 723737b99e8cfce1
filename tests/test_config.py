"""Config: the shipped default, environment overrides, and every refusal naming its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balancers.adaptive import AdaptiveWeights
from balancers.ensemble import EnsembleSettings
from balancers.prefix_affinity import AffinitySettings
from config import table
from config.reader import ConfigError
from config.schema import ENV_OVERRIDES, load, parse

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "router_config.yaml"


def shipped_document() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_config_describes_the_deployment() -> None:
    config = load(SHIPPED, environ={})
    assert config.server.host == "0.0.0.0" and config.server.port == 8000
    assert config.routing.strategy == "round_robin"
    models = {m.name: m for m in config.models}
    assert list(models) == ["mixtral-8x7b", "hermes-2", "openchat-3.5", "phi-3-mini"]
    assert [m.weight for m in config.models] == [1.0, 0.8, 0.6, 0.4]
    assert [m.max_concurrent for m in config.models] == [10, 20, 50, 100]
    assert [m.endpoints[0].url for m in config.models] == [
        f"http://127.0.0.1:{port}" for port in (11400, 11401, 11402, 11403)
    ]
    assert "coding" in models["mixtral-8x7b"].specializations
    assert [e.url for e in config.qdrant.endpoints] == [
        "http://127.0.0.1:6333",
        "http://127.0.0.1:6334",
    ]
    assert [e.name for e in config.embedding.endpoints] == ["embedding-gpu0", "embedding-gpu1"]
    assert (config.health_check.interval, config.health_check.timeout) == (30.0, 5.0)
    breaker = config.circuit_breaker
    assert (breaker.threshold, breaker.timeout, breaker.half_open_limit) == (5, 60.0, 3)
    assert (config.retry.max_retries, config.retry.delay) == (3, 1.0)
    assert config.queue.size == 1000 and config.routing.request_timeout == 30.0
    assert config.routing.max_concurrent_requests == 100


def test_config_objects_are_immutable() -> None:
    config = load(SHIPPED, environ={})
    with pytest.raises(AttributeError):
        config.routing.strategy = "random"  # type: ignore[misc]


def test_every_router_variable_overrides_its_setting() -> None:
    environ = {
        "ROUTER_STRATEGY": "least_connections",
        "ROUTER_HEALTH_CHECK_INTERVAL": "7.5",
        "ROUTER_HEALTH_CHECK_TIMEOUT": "2",
        "ROUTER_CIRCUIT_BREAKER_THRESHOLD": "9",
        "ROUTER_CIRCUIT_BREAKER_TIMEOUT": "12",
        "ROUTER_MAX_RETRIES": "1",
        "ROUTER_RETRY_DELAY": "0.25",
        "ROUTER_QUEUE_SIZE": "50",
        "ROUTER_WORKER_THREADS": "2",
        "ROUTER_METRICS_ENABLED": "false",
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": "9001",
        "ROUTER_ADMIN_TOKEN": "s3cret",
    }
    config = load(SHIPPED, environ=environ)
    assert config.routing.strategy == "least_connections"
    assert config.health_check.interval == 7.5 and config.health_check.timeout == 2.0
    assert config.circuit_breaker.threshold == 9 and config.circuit_breaker.timeout == 12.0
    assert config.retry.max_retries == 1 and config.retry.delay == 0.25
    assert config.queue.size == 50 and config.server.workers == 2
    assert config.metrics.enabled is False
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9001)
    assert config.server.admin_token == "s3cret"


def test_router_config_variable_picks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("routing: {strategy: random}\n")
    assert load(environ={"ROUTER_CONFIG": str(path)}).routing.strategy == "random"


def test_bad_environment_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"server\.port: expected an integer, got 'eighty'"):
        load(SHIPPED, environ={"ROUTER_PORT": "eighty"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["routing"].update(strategy="fastest"),
            r"routing\.strategy: unknown strategy 'fastest' \(valid: round_robin, ",
        ),
        (
            lambda d: d["models"]["hermes-2"]["endpoints"][0].update(url="localhost:11401"),
            r"models\.hermes-2\.endpoints\[0\]\.url: invalid URL 'localhost:11401'",
        ),
        (
            lambda d: d["qdrant"]["endpoints"][1].update(url="http://127.0.0.1:99999"),
            r"qdrant\.endpoints\[1\]\.url: invalid URL 'http://127\.0\.0\.1:99999'",
        ),
        (
            lambda d: d["models"]["phi-3-mini"].update(weight=-0.4),
            r"models\.phi-3-mini\.weight: must be a positive number, got -0\.4",
        ),
        (
            lambda d: d["embedding"]["endpoints"][1].update(name="embedding-gpu0"),
            r"embedding: duplicate backend name 'embedding-gpu0'",
        ),
        (
            lambda d: d["qdrant"]["endpoints"][1].update(url="http://127.0.0.1:6333"),
            r"qdrant\.endpoints\[1\]\.url: duplicate backend 'http://127\.0\.0\.1:6333'",
        ),
        (
            lambda d: d["routing"].update(stratgy="random"),
            r"routing\.stratgy: unknown key \(value 'random'\)",
        ),
        (lambda d: d.update(listen=8000), r"listen: unknown key \(value 8000\)"),
        (
            lambda d: d["models"]["hermes-2"].update(max_concurrent="lots"),
            r"models\.hermes-2\.max_concurrent: expected an integer, got 'lots'",
        ),
    ],
)
def test_bad_config_is_refused_naming_key_path_and_value(change, message) -> None:
    document = shipped_document()
    change(document)
    with pytest.raises(ConfigError, match=message):
        parse(document, environ={})


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routing:\n  strategy: [round_robin\nqueue: {size: 1}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: YAML syntax error at line \d+"):
        load(path, environ={})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_check_config_prints_summary_and_exits_0() -> None:
    result = run_cli("--check-config")
    assert result.returncode == 0, result.stderr
    assert "strategy: round_robin" in result.stdout
    assert "mixtral-8x7b=http://127.0.0.1:11400" in result.stdout
    assert "configuration OK" in result.stdout


def test_check_config_refuses_bad_file_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  x:\n    weight: -1\n    url: http://127.0.0.1:1\n")
    result = run_cli("--check-config", "--config", str(path))
    assert result.returncode == 2
    assert "models.x.weight: must be a positive number, got -1" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("request-router ")


def test_readme_configuration_table_is_rendered_from_the_declarations() -> None:
    """A key added without documentation (or a table edited by hand) fails here: run
    `python -m config.table --write` to update the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{table.BEGIN}\n{table.render()}\n{table.END}" in readme


def test_every_declared_variable_is_in_the_table() -> None:
    rendered = table.render()
    assert all(f"`{variable}`" in rendered for variable in ENV_OVERRIDES)
    assert len(ENV_OVERRIDES) == 19  # ROUTER_REDIS_URL joined (a password stays out of files)


def test_strategy_settings_are_read_from_routing() -> None:
    document = shipped_document()
    document["routing"]["adaptive_weights"] = {"load": 1, "latency": 0, "error": 0}
    document["routing"]["affinity_prefix_chars"] = 64
    routing = parse(document, environ={}).routing
    assert routing.policy(AdaptiveWeights) == AdaptiveWeights(load=1.0, latency=0.0, error=0.0)
    assert routing.policy(AffinitySettings).affinity_prefix_chars == 64
    assert routing.policy(AffinitySettings).affinity_load_factor == 1.25  # declared default
    assert routing.policy(EnsembleSettings).ensemble[0] == ("latency", 0.4)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"adaptive_weights": {"load": "heavy"}}, r"routing\.adaptive_weights\.load: expected a"),
        ({"balanced_weights": {"speed": 1}}, r"routing\.balanced_weights\.speed: unknown key"),
        ({"ensemble": {"fastest": 1}}, r"routing\.ensemble\.fastest: not a strategy that can"),
        ({"ensemble": {}}, r"routing\.ensemble: needs at least one voting strategy"),
        ({"affinity_load_factor": 0.5}, r"routing\.affinity_load_factor: must be >= 1, got 0\.5"),
        ({"latency_decay_seconds": 5}, r"routing\.latency_decay_seconds: unknown key"),
    ],
)
def test_bad_strategy_settings_name_their_key(routing: dict, message: str) -> None:
    document = shipped_document()
    document["routing"].update(routing)
    with pytest.raises(ConfigError, match=message):
        parse(document, environ={})
