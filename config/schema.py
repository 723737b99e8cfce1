"""Configuration: YAML + ROUTER_* environment, parsed once into frozen dataclasses.

Every refusal names the key path and the bad value (`ConfigError`), never a traceback: an
operator reading it should know which line of which file to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from balancers.registry import strategy_names

DEFAULT_CONFIG_PATH = Path("config/router_config.yaml")
BUNDLED_CONFIG_PATH = Path(__file__).resolve().parent / "router_config.yaml"


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    max_body_bytes: int = 10 * 1024 * 1024
    admin_token: str | None = None
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str = "round_robin"
    request_timeout: float = 30.0  # total, for non-streamed requests
    connect_timeout: float = 5.0
    idle_timeout: float = 30.0  # streams: upstream silence before headers and between chunks
    # until response headers; None: the idle timeout (streams) or request_timeout (others)
    first_byte_timeout: float | None = None
    max_concurrent_requests: int = 100
    adaptive_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # load, latency, error
    balanced_weights: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    ensemble: tuple[tuple[str, float], ...] = (
        ("latency", 0.4),
        ("cost_optimized", 0.3),
        ("specialization", 0.3),
    )
    affinity_prefix_chars: int = 256
    affinity_load_factor: float = 1.25
    cache_ttl: float = 60.0  # decision cache, for choices that depend only on the request
    cache_size: int = 1024


@dataclass(frozen=True, slots=True)
class QueueConfig:
    size: int = 1000
    timeout: float = 30.0
    priority_header: str = "X-Priority"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    enabled: bool = True
    interval: float = 30.0
    timeout: float = 5.0
    fall: int = 3
    rise: int = 2


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    threshold: int = 5
    timeout: float = 60.0
    max_timeout: float = 600.0  # the open time doubles on each re-trip, up to this
    half_open_limit: int = 3
    adaptive: bool = False  # also open on slowness (see latency_threshold)
    latency_threshold: float = 2.0  # seconds to response headers
    slow_request_limit: int = 3
    slow_window: float = 60.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 3
    delay: float = 1.0
    max_delay: float = 8.0
    budget_ratio: float = 0.2
    budget_min: int = 3


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class LoadSheddingConfig:
    enabled: bool = True
    max_pending: int = 0  # in flight + queued; 0: max_concurrent_requests + queue.size
    min_healthy_backends: int = 0  # 0: off
    max_failure_rate: float = 0.10
    failure_window: float = 10.0
    min_requests: int = 20  # outcomes in the window before the failure rate counts


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets; 0 turns a limit off. Production value of `rps`: 50."""

    rps: float = 0.0
    burst: float = 0.0  # 0: same as rps
    per_client_rps: float = 0.0
    per_client_burst: float = 0.0


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    """Per-request rows in SQL, written in batches off the request path."""

    enabled: bool = True
    sqlite_path: str = "data/requests.db"
    postgres_dsn: str | None = None  # when set, PostgreSQL instead of SQLite
    buffer_size: int = 10_000  # rows waiting; beyond this, rows are dropped and counted
    batch_size: int = 500
    flush_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    access_log: str | None = None  # one JSON line per request: "-" (stdout) or a file path
    audit_log: str | None = "data/audit.jsonl"  # one JSON line per admin change


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    limit: float = 1000.0  # total spend, in the unit of the models' costs
    on_exhausted: str = "cheapest"  # cost-aware strategies: "cheapest" model only, or "refuse"


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    enabled: bool = False  # the chaos test endpoints of the admin API


@dataclass(frozen=True, slots=True)
class ConnectionPoolConfig:
    """Upstream keep-alive pools of the gateway's one upstream client."""

    limit: int = 1000
    limit_per_host: int = 0
    keepalive_timeout: float = 30.0
    # CA certificates (PEM) that https backends' certificates must chain to, instead of the
    # system's trust store: for backends with certificates from a private CA.
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    name: str
    url: str
    weight: float
    max_concurrent: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    weight: float
    max_concurrent: int
    cost_per_request: float
    cost_per_1k_prompt_tokens: float
    cost_per_1k_completion_tokens: float
    rpm: int  # requests per minute for this model; 0: no limit
    quality: float  # 0-1, for quality_optimized and balanced
    priority: int  # lower first, for the priority strategy
    context_length: int  # tokens; 0: unknown
    capabilities: tuple[str, ...]
    specializations: tuple[str, ...]
    health_path: str
    endpoints: tuple[EndpointConfig, ...]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """A non-model pool: Qdrant or the embedding servers."""

    name: str
    health_path: str
    endpoints: tuple[EndpointConfig, ...]


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    routing: RoutingConfig
    queue: QueueConfig
    health_check: HealthCheckConfig
    circuit_breaker: CircuitBreakerConfig
    retry: RetryConfig
    metrics: MetricsConfig
    load_shedding: LoadSheddingConfig
    rate_limit: RateLimitConfig
    chaos: ChaosConfig
    accounting: AccountingConfig
    budget: BudgetConfig
    logging: LoggingConfig
    connection_pool: ConnectionPoolConfig
    models: tuple[ModelConfig, ...]
    qdrant: ServiceConfig
    embedding: ServiceConfig
    fallbacks: dict[str, tuple[str, ...]]
    source: str = "<defaults>"

    def summary(self) -> str:
        lines = [
            f"config: {self.source}",
            f"listen: {self.server.host}:{self.server.port}  strategy: {self.routing.strategy}",
        ]
        for model in self.models:
            urls = ", ".join(f"{e.name}={e.url}" for e in model.endpoints)
            lines.append(f"model {model.name} (weight {model.weight:g}): {urls}")
        for service in (self.qdrant, self.embedding):
            urls = ", ".join(f"{e.name}={e.url}" for e in service.endpoints)
            lines.append(f"{service.name}: {urls or '(none)'}")
        return "\n".join(lines)


# ROUTER_* variable -> (section, key). Values are strings and are converted by the key's type.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "ROUTER_STRATEGY": ("routing", "strategy"),
    "ROUTER_HEALTH_CHECK_INTERVAL": ("health_check", "interval"),
    "ROUTER_HEALTH_CHECK_TIMEOUT": ("health_check", "timeout"),
    "ROUTER_CIRCUIT_BREAKER_THRESHOLD": ("circuit_breaker", "threshold"),
    "ROUTER_CIRCUIT_BREAKER_TIMEOUT": ("circuit_breaker", "timeout"),
    "ROUTER_MAX_RETRIES": ("retry", "max_retries"),
    "ROUTER_RETRY_DELAY": ("retry", "delay"),
    "ROUTER_QUEUE_SIZE": ("queue", "size"),
    "ROUTER_WORKER_THREADS": ("server", "workers"),
    "ROUTER_METRICS_ENABLED": ("metrics", "enabled"),
    "ROUTER_HOST": ("server", "host"),
    "ROUTER_PORT": ("server", "port"),
    "ROUTER_ADMIN_TOKEN": ("server", "admin_token"),
    "ROUTER_POSTGRES_DSN": ("accounting", "postgres_dsn"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Section:
    """Reads typed keys from one mapping and refuses whatever is left unread."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {data!r}")
        self._data = dict(data)
        self._path = path

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def raw(self, key: str, default: Any = None) -> Any:
        return self._data.pop(key, default)

    def string(self, key: str, default: str | None) -> str | None:
        value = self._data.pop(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self._key(key)}: expected a string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._data.pop(key, default)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            value = value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self._data.pop(key, default)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._key(key)}: expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self._key(key)}: must be >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._data.pop(key, default)
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._key(key)}: expected a number, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self._key(key)}: must be >= {minimum:g}, got {value!r}")
        return float(value)

    def optional_number(self, key: str, *, minimum: float = 0.0) -> float | None:
        if self._data.get(key) is None:
            self._data.pop(key, None)
            return None
        return self.number(key, 0.0, minimum=minimum)

    def existing_file(self, key: str) -> str | None:
        """An optional path that must name a file (checked now, not at first use)."""
        value = self.string(key, None) or None
        if value is not None and not os.path.isfile(value):
            raise ConfigError(f"{self._key(key)}: no such file {value!r}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._data.pop(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._key(key)}: expected a list of strings, got {value!r}")
        return tuple(value)

    def done(self) -> None:
        if self._data:
            key = next(iter(self._data))
            raise ConfigError(f"{self._key(str(key))}: unknown key (value {self._data[key]!r})")


def _check_url(url: Any, path: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{path}: expected a URL string, got {url!r}")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid URL {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{path}: invalid URL {url!r} (expected http://host:port)")
    if parts.query or parts.fragment:
        raise ConfigError(f"{path}: invalid URL {url!r} (no query or fragment allowed)")
    return url.rstrip("/")


def _endpoints(
    raw: Any, path: str, default_name: str, weight: float, max_concurrent: int
) -> tuple[EndpointConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list of endpoints, got {raw!r}")
    endpoints = []
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        if isinstance(item, str):
            item = {"url": item}
        section = _Section(item, item_path)
        url = _check_url(section.raw("url"), f"{item_path}.url")
        fallback = default_name if len(raw) == 1 else f"{default_name}-{index}"
        name = section.string("name", fallback) or fallback
        endpoint = EndpointConfig(
            name=name,
            url=url,
            weight=_positive_weight(section, weight),
            max_concurrent=section.integer("max_concurrent", max_concurrent, minimum=1),
        )
        section.done()
        endpoints.append(endpoint)
    urls = [e.url for e in endpoints]
    for index, url in enumerate(urls):
        if url in urls[:index]:
            raise ConfigError(f"{path}[{index}].url: duplicate backend {url!r} in this pool")
    return tuple(endpoints)


def _positive_weight(section: _Section, default: float) -> float:
    weight = section.number("weight", default, minimum=float("-inf"))
    if weight <= 0:
        raise ConfigError(f"{section._key('weight')}: must be a positive number, got {weight!r}")
    return weight


def _model(name: Any, data: Any) -> ModelConfig:
    path = f"models.{name}"
    if not isinstance(name, str) or not name or name == "auto":
        raise ConfigError(f"{path}: invalid model name {name!r}")
    section = _Section(data, path)
    weight = _positive_weight(section, 1.0)
    max_concurrent = section.integer("max_concurrent", 100, minimum=1)
    cost = section.number("cost_per_request", 0.0)
    prompt_price = section.number("cost_per_1k_prompt_tokens", 0.0)
    completion_price = section.number("cost_per_1k_completion_tokens", 0.0)
    rpm = section.integer("rpm", 0)
    quality = section.number("quality", 0.5)
    if quality > 1:
        raise ConfigError(f"{path}.quality: must be between 0 and 1, got {quality!r}")
    priority = section.integer("priority", 100)
    context_length = section.integer("context_length", 0)
    capabilities = section.strings("capabilities")
    specializations = section.strings("specializations")
    health_path = section.string("health_path", "/health") or "/health"
    url = section.raw("url")
    raw_endpoints = section.raw("endpoints")
    if url is not None and raw_endpoints is not None:
        raise ConfigError(f"{path}: give either url or endpoints, not both")
    if url is None and raw_endpoints is None:
        raise ConfigError(f"{path}.endpoints: missing (each model needs at least one endpoint)")
    if url is not None:
        raw_endpoints = [_check_url(url, f"{path}.url")]
    endpoints = _endpoints(raw_endpoints, f"{path}.endpoints", name, weight, max_concurrent)
    if not endpoints:
        raise ConfigError(f"{path}.endpoints: empty (each model needs at least one endpoint)")
    section.done()
    return ModelConfig(
        name=name,
        weight=weight,
        max_concurrent=max_concurrent,
        cost_per_request=cost,
        cost_per_1k_prompt_tokens=prompt_price,
        cost_per_1k_completion_tokens=completion_price,
        rpm=rpm,
        quality=quality,
        priority=priority,
        context_length=context_length,
        capabilities=capabilities,
        specializations=specializations,
        health_path=health_path,
        endpoints=endpoints,
    )


def _service(name: str, data: Any, health_path: str) -> ServiceConfig:
    section = _Section(data, name)
    path = section.string("health_path", health_path) or health_path
    max_concurrent = section.integer("max_concurrent", 100, minimum=1)
    endpoints = _endpoints(
        section.raw("endpoints", []), f"{name}.endpoints", name, 1.0, max_concurrent
    )
    section.done()
    return ServiceConfig(name=name, health_path=path, endpoints=endpoints)


def _weights(data: Any, path: str, names: tuple[str, ...], default: tuple[float, ...]) -> Any:
    section = _Section(data, path)
    weights = tuple(section.number(name, value) for name, value in zip(names, default, strict=True))
    section.done()
    return weights


def _ensemble(data: Any) -> tuple[tuple[str, float], ...]:
    if data is None:
        return RoutingConfig().ensemble
    section = _Section(data, "routing.ensemble")
    voters = []
    for name in list(section._data):
        if name not in strategy_names() or name == "ensemble":
            raise ConfigError(
                f"routing.ensemble.{name}: not a strategy that can vote"
                f" (valid: {', '.join(n for n in strategy_names() if n != 'ensemble')})"
            )
        voters.append((str(name), section.number(str(name), 0.0)))
    section.done()
    if not voters:
        raise ConfigError("routing.ensemble: needs at least one voting strategy")
    return tuple(voters)


def _fallbacks(data: Any, models: list[str]) -> dict[str, tuple[str, ...]]:
    section = _Section(data, "fallbacks")
    chains = {}
    for model in list(section._data):
        path = f"fallbacks.{model}"
        if model not in models:
            raise ConfigError(f"{path}: unknown model {model!r} (models: {', '.join(models)})")
        chain = section.strings(str(model))
        for index, target in enumerate(chain):
            if target not in models or target == model:
                raise ConfigError(
                    f"{path}[{index}]: {target!r} is not another configured model"
                    f" (models: {', '.join(models)})"
                )
        chains[str(model)] = chain
    section.done()
    return chains


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping, got {target!r}")
        target[key] = value


def parse(data: Any, environ: Mapping[str, str] | None = None, source: str = "<dict>") -> Config:
    """Validate a decoded config document (plus environment overrides) into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"<top level>: expected a mapping, got {data!r}")
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    _apply_env(data, os.environ if environ is None else environ)
    root = _Section(data, "")

    s = _Section(root.raw("server"), "server")
    server = ServerConfig(
        host=s.string("host", "0.0.0.0") or "0.0.0.0",
        port=s.integer("port", 8000),
        workers=s.integer("workers", 1, minimum=1),
        max_body_bytes=s.integer("max_body_bytes", 10 * 1024 * 1024, minimum=1),
        admin_token=s.string("admin_token", None) or None,
        shutdown_grace=s.number("shutdown_grace", 30.0),
    )
    if server.port > 65535:
        raise ConfigError(f"server.port: must be <= 65535, got {server.port!r}")
    s.done()

    s = _Section(root.raw("routing"), "routing")
    strategy = s.string("strategy", "round_robin")
    if strategy not in strategy_names():
        raise ConfigError(
            f"routing.strategy: unknown strategy {strategy!r}"
            f" (valid: {', '.join(strategy_names())})"
        )
    routing = RoutingConfig(
        strategy=strategy,
        request_timeout=s.number("request_timeout", 30.0, minimum=0.001),
        connect_timeout=s.number("connect_timeout", 5.0, minimum=0.001),
        idle_timeout=s.number("idle_timeout", 30.0, minimum=0.001),
        first_byte_timeout=s.optional_number("first_byte_timeout", minimum=0.001),
        max_concurrent_requests=s.integer("max_concurrent_requests", 100, minimum=1),
        adaptive_weights=_weights(
            s.raw("adaptive_weights"),
            "routing.adaptive_weights",
            ("load", "latency", "error"),
            (0.4, 0.4, 0.2),
        ),
        balanced_weights=_weights(
            s.raw("balanced_weights"),
            "routing.balanced_weights",
            ("cost", "latency", "quality", "load"),
            (0.3, 0.3, 0.3, 0.1),
        ),
        ensemble=_ensemble(s.raw("ensemble")),
        affinity_prefix_chars=s.integer("affinity_prefix_chars", 256, minimum=1),
        affinity_load_factor=s.number("affinity_load_factor", 1.25, minimum=1.0),
        cache_ttl=s.number("cache_ttl", 60.0),
        cache_size=s.integer("cache_size", 1024, minimum=1),
    )
    s.done()

    s = _Section(root.raw("queue"), "queue")
    queue = QueueConfig(
        size=s.integer("size", 1000),
        timeout=s.number("timeout", 30.0),
        priority_header=s.string("priority_header", "X-Priority") or "X-Priority",
    )
    s.done()

    s = _Section(root.raw("health_check"), "health_check")
    health = HealthCheckConfig(
        enabled=s.boolean("enabled", True),
        interval=s.number("interval", 30.0, minimum=0.01),
        timeout=s.number("timeout", 5.0, minimum=0.001),
        fall=s.integer("fall", 3, minimum=1),
        rise=s.integer("rise", 2, minimum=1),
    )
    s.done()

    s = _Section(root.raw("circuit_breaker"), "circuit_breaker")
    breaker = CircuitBreakerConfig(
        threshold=s.integer("threshold", 5, minimum=1),
        timeout=s.number("timeout", 60.0),
        max_timeout=s.number("max_timeout", 600.0),
        half_open_limit=s.integer("half_open_limit", 3, minimum=1),
        adaptive=s.boolean("adaptive", False),
        latency_threshold=s.number("latency_threshold", 2.0, minimum=0.001),
        slow_request_limit=s.integer("slow_request_limit", 3, minimum=1),
        slow_window=s.number("slow_window", 60.0, minimum=0.001),
    )
    s.done()

    s = _Section(root.raw("retry"), "retry")
    retry = RetryConfig(
        max_retries=s.integer("max_retries", 3),
        delay=s.number("delay", 1.0),
        max_delay=s.number("max_delay", 8.0),
        budget_ratio=s.number("budget_ratio", 0.2),
        budget_min=s.integer("budget_min", 3),
    )
    s.done()

    s = _Section(root.raw("metrics"), "metrics")
    metrics = MetricsConfig(enabled=s.boolean("enabled", True))
    s.done()

    s = _Section(root.raw("load_shedding"), "load_shedding")
    shedding = LoadSheddingConfig(
        enabled=s.boolean("enabled", True),
        max_pending=s.integer("max_pending", 0),
        min_healthy_backends=s.integer("min_healthy_backends", 0),
        max_failure_rate=s.number("max_failure_rate", 0.10),
        failure_window=s.number("failure_window", 10.0, minimum=0.1),
        min_requests=s.integer("min_requests", 20, minimum=1),
    )
    s.done()

    s = _Section(root.raw("rate_limit"), "rate_limit")
    rate_limit = RateLimitConfig(
        rps=s.number("rps", 0.0),
        burst=s.number("burst", 0.0),
        per_client_rps=s.number("per_client_rps", 0.0),
        per_client_burst=s.number("per_client_burst", 0.0),
    )
    s.done()

    s = _Section(root.raw("chaos"), "chaos")
    chaos = ChaosConfig(enabled=s.boolean("enabled", False))
    s.done()

    s = _Section(root.raw("accounting"), "accounting")
    accounting = AccountingConfig(
        enabled=s.boolean("enabled", True),
        sqlite_path=s.string("sqlite_path", "data/requests.db") or "data/requests.db",
        postgres_dsn=s.string("postgres_dsn", None) or None,
        buffer_size=s.integer("buffer_size", 10_000, minimum=1),
        batch_size=s.integer("batch_size", 500, minimum=1),
        flush_interval=s.number("flush_interval", 1.0, minimum=0.01),
    )
    s.done()

    s = _Section(root.raw("budget"), "budget")
    on_exhausted = s.string("on_exhausted", "cheapest") or "cheapest"
    if on_exhausted not in ("cheapest", "refuse"):
        raise ConfigError(
            f"budget.on_exhausted: expected 'cheapest' or 'refuse', got {on_exhausted!r}"
        )
    budget = BudgetConfig(limit=s.number("limit", 1000.0), on_exhausted=on_exhausted)
    s.done()

    s = _Section(root.raw("logging"), "logging")
    logging_config = LoggingConfig(
        access_log=s.string("access_log", None) or None,
        audit_log=s.string("audit_log", "data/audit.jsonl") or None,
    )
    s.done()

    s = _Section(root.raw("connection_pool"), "connection_pool")
    pool = ConnectionPoolConfig(
        limit=s.integer("limit", 1000),
        limit_per_host=s.integer("limit_per_host", 0),
        keepalive_timeout=s.number("keepalive_timeout", 30.0),
        ca_file=s.existing_file("ca_file"),
    )
    s.done()

    raw_models = root.raw("models", {})
    if not isinstance(raw_models, Mapping):
        raise ConfigError(
            f"models: expected a mapping of model name to settings, got {raw_models!r}"
        )
    models = tuple(_model(name, settings) for name, settings in raw_models.items())
    qdrant = _service("qdrant", root.raw("qdrant"), "/healthz")
    embedding = _service("embedding", root.raw("embedding"), "/health")
    fallbacks = _fallbacks(root.raw("fallbacks"), [m.name for m in models])
    root.done()

    seen: dict[str, str] = {}
    groups: list[tuple[str, tuple[EndpointConfig, ...]]] = [
        (f"models.{m.name}", m.endpoints) for m in models
    ]
    groups += [("qdrant", qdrant.endpoints), ("embedding", embedding.endpoints)]
    for path, endpoints in groups:
        for endpoint in endpoints:
            if endpoint.name in seen:
                raise ConfigError(
                    f"{path}: duplicate backend name {endpoint.name!r}"
                    f" (already used in {seen[endpoint.name]})"
                )
            seen[endpoint.name] = path

    return Config(
        server=server,
        routing=routing,
        queue=queue,
        health_check=health,
        circuit_breaker=breaker,
        retry=retry,
        metrics=metrics,
        load_shedding=shedding,
        rate_limit=rate_limit,
        chaos=chaos,
        accounting=accounting,
        budget=budget,
        logging=logging_config,
        connection_pool=pool,
        models=models,
        qdrant=qdrant,
        embedding=embedding,
        fallbacks=fallbacks,
        source=source,
    )


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file. `path` None means ROUTER_CONFIG or the default."""
    env = os.environ if environ is None else environ
    if path is None:
        path = env.get("ROUTER_CONFIG") or default_config_path()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse(data, env, source=str(path))


def default_config_path() -> Path:
    """config/router_config.yaml in the working directory, else the one shipped with the code."""
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else BUNDLED_CONFIG_PATH
