"""Configuration: YAML + ROUTER_* environment, parsed once into frozen dataclasses.

Each key is declared once, below or beside the balancing policy that owns it: its type (the
annotation), default, bounds, ROUTER_* variable and help (`setting`). config.reader turns a
document into these classes by walking the declarations; config.table renders the README's
table from them. Precedence: command line > ROUTER_* > file > defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from balancers.registry import policy_settings, strategy_names
from balancers.request import SLOW_RESPONSE_SECONDS
from balancers.settings import setting
from config.reader import ConfigError, Section, declared_fields, read, read_keys

S = TypeVar("S", bound="ServiceConfig")

DEFAULT_CONFIG_PATH = Path("config/router_config.yaml")
BUNDLED_CONFIG_PATH = Path(__file__).resolve().parent / "router_config.yaml"


def known_strategy(name: str, path: str) -> str:
    if name not in strategy_names():
        raise ValueError(
            f"{path}: unknown strategy {name!r} (valid: {', '.join(strategy_names())})"
        )
    return name


def networks(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    for index, item in enumerate(value):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"{path}[{index}]: not an address or CIDR: {item!r} ({exc})") from None
    return value


def existing_file(value: str, path: str) -> str:
    """Checked now, not at first use."""
    if not os.path.isfile(value):
        raise ValueError(f"{path}: no such file {value!r}")
    return value


def backend_url(url: str, path: str) -> str:
    """An http(s) origin (a path prefix allowed), without a trailing slash."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{path}: invalid URL {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{path}: invalid URL {url!r} (expected http://host:port)")
    if parts.query or parts.fragment:
        raise ValueError(f"{path}: invalid URL {url!r} (no query or fragment allowed)")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = setting("0.0.0.0", env="ROUTER_HOST", help="address to listen on")
    port: int = setting(8000, maximum=65535, env="ROUTER_PORT", help="port to listen on")
    workers: int = setting(
        1, minimum=1, env="ROUTER_WORKER_THREADS", help="worker processes sharing the port"
    )
    max_body_bytes: int = setting(
        10 * 1024 * 1024, minimum=1, shown="10 MiB", help="larger request bodies get 413"
    )
    admin_token: str | None = setting(
        None,
        env="ROUTER_ADMIN_TOKEN",
        help="bearer token for admin writes; without it they are loopback-only",
    )
    shutdown_grace: float = setting(
        30.0, help="seconds in-flight requests get to finish on SIGTERM"
    )
    header_timeout: float = setting(
        10.0, help="seconds a request head may take to arrive (then 408); 0 = off"
    )
    body_timeout: float = setting(
        30.0, help="seconds a request body may go silent (then 408); 0 = off"
    )
    max_connections_per_client: int = setting(
        0, help="connections one address may hold (more get 429); 0 = no cap"
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        validate=networks,
        help="addresses or CIDRs whose X-Forwarded-For is kept (others' is replaced)",
    )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str = setting(
        "round_robin",
        env="ROUTER_STRATEGY",
        validate=known_strategy,
        help="balancing strategy (see Balancing strategies)",
    )
    request_timeout: float = setting(
        30.0, minimum=0.001, help="total seconds for a non-streamed request"
    )
    connect_timeout: float = setting(5.0, minimum=0.001, help="seconds to connect to a backend")
    idle_timeout: float = setting(
        30.0,
        minimum=0.001,
        help="streams: seconds of upstream silence (before headers, between chunks)",
    )
    first_byte_timeout: float | None = setting(
        None,
        minimum=0.001,
        help="seconds until response headers; unset: idle_timeout (streams), else request_timeout",
    )
    max_concurrent_requests: int = setting(100, minimum=1, help="global cap on requests in flight")
    cache_ttl: float = setting(
        60.0, help="seconds a request-only model choice is reused (decision cache); 0 = off"
    )
    cache_size: int = setting(1024, minimum=1, help="decisions the cache holds (LRU)")
    # The strategies' own settings (balancers.*: AdaptiveSettings, AffinitySettings, ...), read
    # from this same `routing:` mapping: one instance per policy that declares settings.
    policies: tuple[object, ...] = ()

    def policy(self, kind: type[Any]) -> Any:
        """The configured settings of one policy (its declared defaults if none)."""
        return next((p for p in self.policies if isinstance(p, kind)), kind())


@dataclass(frozen=True, slots=True)
class QueueConfig:
    size: int = setting(1000, env="ROUTER_QUEUE_SIZE", help="waiting requests; full -> 503")
    timeout: float = setting(30.0, help="seconds a request may wait for a slot")
    priority_header: str = setting("X-Priority", help="header naming high | normal | low")


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    enabled: bool = setting(True, help="active health probes")
    interval: float = setting(
        30.0, minimum=0.01, env="ROUTER_HEALTH_CHECK_INTERVAL", help="seconds between probes"
    )
    timeout: float = setting(
        5.0, minimum=0.001, env="ROUTER_HEALTH_CHECK_TIMEOUT", help="seconds a probe may take"
    )
    fall: int = setting(3, minimum=1, help="consecutive failures to mark a backend down")
    rise: int = setting(2, minimum=1, help="consecutive successes to mark it up again")


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    threshold: int = setting(
        5, minimum=1, env="ROUTER_CIRCUIT_BREAKER_THRESHOLD", help="failures that open it"
    )
    timeout: float = setting(
        60.0, env="ROUTER_CIRCUIT_BREAKER_TIMEOUT", help="seconds open before a trial"
    )
    max_timeout: float = setting(600.0, help="open time doubles on each re-trip, up to this")
    half_open_limit: int = setting(3, minimum=1, help="trial requests while half-open")
    adaptive: bool = setting(False, help="also open on slowness (the three keys below)")
    latency_threshold: float = setting(
        SLOW_RESPONSE_SECONDS,
        minimum=0.001,
        help="seconds to response headers that count as slow (also adaptive's slow threshold)",
    )
    slow_request_limit: int = setting(
        3, minimum=1, help="slow responses within slow_window that open it"
    )
    slow_window: float = setting(60.0, minimum=0.001, help="seconds slow responses are counted")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = setting(3, env="ROUTER_MAX_RETRIES", help="retries after the first try")
    delay: float = setting(
        1.0, env="ROUTER_RETRY_DELAY", help="seconds of backoff (exponential, with jitter)"
    )
    max_delay: float = setting(8.0, help="longest backoff, seconds")
    budget_ratio: float = setting(0.2, help="retries may add this share of the request rate...")
    budget_min: int = setting(3, help="...plus this many per second")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = setting(True, env="ROUTER_METRICS_ENABLED", help="Prometheus /metrics")


@dataclass(frozen=True, slots=True)
class LoadSheddingConfig:
    enabled: bool = setting(True, help="refuse early (503) when the gateway cannot keep up")
    max_pending: int = setting(
        0, help="in flight + queued; 0 = max_concurrent_requests + queue.size"
    )
    min_healthy_backends: int = setting(0, help="shed when fewer healthy backends remain; 0 = off")
    max_failure_rate: float = setting(
        0.10, maximum=0.99, help="per pool: backend failures it takes before shedding starts..."
    )
    failure_window: float = setting(10.0, minimum=0.1, help="...over this many seconds...")
    min_requests: int = setting(20, minimum=1, help="...once the window holds this many answers")
    max_rejection_probability: float = setting(
        0.8, maximum=1, help="a failing pool's share of requests refused, at most"
    )


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets; 0 turns a limit off. Production value of `rps`: 50."""

    rps: float = setting(0.0, help="gateway-wide requests per second; 0 = off")
    burst: float = setting(0.0, help="bucket size; 0 = same as rps")
    per_client_rps: float = setting(
        0.0, help="per client (auth.api_keys) or else per peer address; 0 = off"
    )
    per_client_burst: float = setting(0.0, help="per-client bucket size; 0 = same as the rate")


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    """Per-request rows in SQL, written in batches off the request path."""

    enabled: bool = setting(True, help="one SQL row per request")
    sqlite_path: str = setting("data/requests.db", help="the embedded database")
    postgres_dsn: str | None = setting(
        None, env="ROUTER_POSTGRES_DSN", help="when set, PostgreSQL instead of SQLite"
    )
    buffer_size: int = setting(
        10_000, minimum=1, help="rows waiting; beyond this, rows are dropped and counted"
    )
    batch_size: int = setting(500, minimum=1, help="rows per write")
    flush_interval: float = setting(1.0, minimum=0.01, help="seconds between writes")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    access_log: str | None = setting(
        None, help='one JSON line per request: "-" (stdout) or a file path'
    )
    audit_log: str | None = setting(
        "data/audit.jsonl", help="one JSON line per admin change; empty = off"
    )


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    limit: float = setting(1000.0, help="total spend, in the unit of the models' costs")
    period: str = setting(
        "none",
        choices=("none", "daily", "monthly"),
        help="the spend counted starts again each UTC day or month; none: a lifetime total",
    )
    on_exhausted: str = setting(
        "cheapest",
        choices=("cheapest", "refuse"),
        help="cost-aware strategies then use the cheapest model, or refuse (402)",
    )


def redis_url(value: str, path: str) -> str:
    """redis://, rediss:// or unix://; the message never repeats the URL (it may hold a
    password)."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError(f"{path}: not a valid URL (expected redis://host:port/db)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{path}: expected a redis://, rediss:// or unix:// URL")
    return value


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Shared state between gateway hosts (README: Several hosts). Nothing here is on the
    request path: a background sync exchanges it every `sync_interval`."""

    enabled: bool = setting(
        False,
        help="share rate limits, spend, strategy overrides, breaker hints and membership"
        " with the other gateways using this Redis and key_prefix",
    )
    url: str = setting(
        "redis://127.0.0.1:6379/0",
        env="ROUTER_REDIS_URL",
        validate=redis_url,
        help="redis://[user:password@]host:port/db, rediss:// (TLS) or unix://path",
    )
    key_prefix: str = setting(
        "request-router", help="prefix of every key and channel: gateways sharing it act as one"
    )
    sync_interval: float = setting(
        0.1, minimum=0.01, help="seconds between syncs, one pipelined round trip each"
    )
    timeout: float = setting(
        0.25, minimum=0.001, help="seconds a connect or a sync may take; never retried"
    )
    member_ttl: float = setting(
        3.0, minimum=0.05, help="seconds after its last heartbeat a member stops counting as live"
    )
    on_failure: str = setting(
        "local_share",
        choices=("local_share", "open", "closed"),
        help="while Redis is unreachable, limits become rate / live members, stay as"
        " configured on each member, or refuse the traffic they apply to",
    )
    failure_threshold: int = setting(
        3, minimum=1, help="failed syncs in a row that open Redis's breaker"
    )
    retry_after: float = setting(
        1.0, minimum=0.01, help="seconds Redis's breaker stays open before a trial sync"
    )


def listen_address(value: str, path: str) -> str:
    """`host:port` (`[v6]:port`), or a Unix socket: `unix:/path` or an absolute path."""
    if value.startswith(("unix:", "/")):
        if not value.removeprefix("unix:").startswith("/"):
            raise ValueError(f"{path}: a Unix socket needs an absolute path, got {value!r}")
        return value
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{path}: invalid address {value!r} ({exc})") from None
    if not parts.hostname or port is None:
        raise ValueError(f"{path}: expected host:port or unix:/path, got {value!r}")
    return value


def distinct_keys(value: tuple[tuple[str, str], ...], path: str) -> tuple[tuple[str, str], ...]:
    """Each key names one client: a key given twice could not say which."""
    seen: dict[str, str] = {}
    for name, key in value:
        if key in seen:
            raise ValueError(f"{path}.{name}: the same key as {path}.{seen[key]}")
        seen[key] = name
    return value


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Who may use the admin plane, and where (README: Admin access). The admin token itself
    is server.admin_token (ROUTER_ADMIN_TOKEN)."""

    listen: str | None = setting(
        None,
        env="ROUTER_ADMIN_LISTEN",
        validate=listen_address,
        help="the admin plane's own listener, host:port or unix:/path; the main port then"
        " answers admin requests only to loopback peers and token holders",
    )
    reads: str = setting(
        "open",
        choices=("open", "local", "token"),
        env="ROUTER_ADMIN_READS",
        help="who may read admin state and reports: anyone, loopback peers and token holders,"
        " or token holders only (loopback when no token is set)",
    )
    hosts: tuple[str, ...] = setting(
        (),
        help="names besides localhost and the listen address a Host header may give when"
        " admin access is granted by the peer's place",
    )
    max_token_failures: int = setting(
        5, help="bad admin tokens a peer may send in a minute; then 429 for the minute; 0 = off"
    )


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Browsers calling the proxied API from other sites' pages (the admin API never answers
    them). Read at start: restart to turn it on or off; a reload changes the lists."""

    allowed_origins: tuple[str, ...] = setting(
        (), help='origins a page may call the proxied API from ("https://app.example"), or "*"'
    )
    allowed_headers: tuple[str, ...] = setting(
        ("Authorization", "Content-Type", "X-API-Key", "X-Request-ID", "X-Priority"),
        help="request headers a page may send",
    )
    max_age: int = setting(600, minimum=0, help="seconds a browser may cache a preflight answer")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Client authentication for the proxied API (README: Client keys)."""

    api_keys: tuple[tuple[str, str], ...] = setting(
        (),
        env="ROUTER_API_KEYS",
        validate=distinct_keys,
        shown="none",
        help="{client name: key}: when set, proxied requests need one of these keys (Bearer or"
        " X-API-Key; 401 otherwise) and per-client limits key on the client's name",
    )


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    enabled: bool = setting(
        False, env="ROUTER_CHAOS_ENABLED", help="the admin API's chaos test endpoints (--demo: on)"
    )


@dataclass(frozen=True, slots=True)
class ConnectionPoolConfig:
    """Upstream keep-alive pools of the gateway's one upstream client."""

    limit: int = setting(1000, help="connections to all backends")
    limit_per_host: int = setting(0, help="0 = no per-host cap beyond max_concurrent")
    keepalive_timeout: float = setting(30.0, help="seconds an idle connection is kept")
    ca_file: str | None = setting(
        None,
        validate=existing_file,
        shown="system trust store",
        help="PEM CA certificates https backends must chain to (a private CA)",
    )


HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def extra_headers(value: tuple[tuple[str, str], ...], path: str) -> tuple[tuple[str, str], ...]:
    """An endpoint's extra headers: names that are tokens and not the gateway's own framing,
    values without line breaks (they are written into the request as they are)."""
    for name, header_value in value:
        if not HEADER_NAME.match(name) or "_" in name:
            raise ValueError(f"{path}.{name}: not a header name (letters, digits, '-')")
        if name.lower() in OWN_HEADERS:
            raise ValueError(f"{path}.{name}: set by the gateway itself")
        if "\r" in header_value or "\n" in header_value or "\0" in header_value:
            raise ValueError(f"{path}.{name}: the value holds a line break")
    return value


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    name: str = setting(
        shown="the pool's name, -N if several", help="backend name (unique; in x-router-backend)"
    )
    url: str = setting(shown="required", validate=backend_url, help="http(s)://host:port")
    max_concurrent: int = setting(
        shown="the pool's", minimum=1, help="requests in flight on this endpoint"
    )
    weight: float = setting(1.0, shown="the model's, else 1", positive=True, help="for `weighted`")
    served_model_name: str | None = setting(
        None,
        shown="the model's name",
        help="models: the name the backend serves it under; the body is rewritten if it differs",
    )
    headers: tuple[tuple[str, str], ...] = setting(
        (),
        shown="none",
        validate=extra_headers,
        help="{name: value} sent to this backend, replacing the client's (an API key)",
    )
    backup: bool = setting(
        False, help="used only while no other endpoint of the pool is live (HAProxy's backup)"
    )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str  # the key under `models:`
    weight: float = setting(1.0, positive=True, help="for `weighted`; endpoints inherit it")
    max_concurrent: int = setting(100, minimum=1, help="per endpoint; endpoints inherit it")
    cost_per_request: float = setting(0.0, help="spend per request (budget, cost strategies)")
    cost_per_1k_prompt_tokens: float = setting(0.0, help="spend per 1000 prompt tokens")
    cost_per_1k_completion_tokens: float = setting(0.0, help="spend per 1000 completion tokens")
    rpm: int = setting(0, help="requests per minute for this model; 0 = no limit")
    quality: float = setting(0.5, maximum=1, help="0-1, for quality_optimized and balanced")
    priority: int = setting(100, help="lower first, for the priority strategy")
    context_length: int = setting(0, help="tokens the model accepts; 0 = unknown")
    capabilities: tuple[str, ...] = setting((), help="what it serves: chat, completion, ...")
    specializations: tuple[str, ...] = setting((), help="kinds of work, for specialization")
    health_path: str = setting("/health", help="path the health probe requests")
    url: str | None = setting(
        None, validate=backend_url, help="shorthand for one endpoint (instead of endpoints)"
    )
    endpoints: tuple[EndpointConfig, ...] = setting(
        (), shown="required", help="the replicas: a list of URLs or endpoint mappings"
    )


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """A non-model pool: Qdrant or the embedding servers."""

    name: str
    health_path: str = setting("/health", help="path the health probe requests")
    max_concurrent: int = setting(100, minimum=1, help="per endpoint; endpoints inherit it")
    endpoints: tuple[EndpointConfig, ...] = setting(
        (), help="the replicas: a list of URLs or endpoint mappings, as for models"
    )


@dataclass(frozen=True, slots=True)
class QdrantConfig(ServiceConfig):
    name: str = "qdrant"
    health_path: str = setting("/healthz", help="path the health probe requests")
    writes: str = setting(
        "all",
        choices=("all", "primary", "any"),
        help="/qdrant/ writes: the first endpoint answers, copies go to every other (all);"
        " the first only (primary); or wherever the balancer sends them (any: a cluster that"
        " replicates itself)",
    )


@dataclass(frozen=True, slots=True)
class EmbeddingConfig(ServiceConfig):
    name: str = "embedding"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = setting(ServerConfig(), help="the listener")
    routing: RoutingConfig = setting(RoutingConfig(), help="strategy, timeouts, decision cache")
    queue: QueueConfig = setting(QueueConfig(), help="requests waiting for a slot")
    health_check: HealthCheckConfig = setting(HealthCheckConfig(), help="active probes")
    circuit_breaker: CircuitBreakerConfig = setting(CircuitBreakerConfig(), help="per backend")
    retry: RetryConfig = setting(RetryConfig(), help="retries and their budget")
    metrics: MetricsConfig = setting(MetricsConfig(), help="Prometheus")
    load_shedding: LoadSheddingConfig = setting(LoadSheddingConfig(), help="early refusals")
    rate_limit: RateLimitConfig = setting(RateLimitConfig(), help="token buckets")
    chaos: ChaosConfig = setting(ChaosConfig(), help="fault injection")
    admin: AdminConfig = setting(AdminConfig(), help="admin plane access")
    auth: AuthConfig = setting(AuthConfig(), help="client keys")
    cors: CorsConfig = setting(CorsConfig(), help="cross-origin calls of the proxied API")
    accounting: AccountingConfig = setting(AccountingConfig(), help="per-request rows")
    budget: BudgetConfig = setting(BudgetConfig(), help="spend limit")
    logging: LoggingConfig = setting(LoggingConfig(), help="access and audit logs")
    redis: RedisConfig = setting(RedisConfig(), help="state shared between hosts")
    connection_pool: ConnectionPoolConfig = setting(ConnectionPoolConfig(), help="upstream")
    models: tuple[ModelConfig, ...] = setting(
        (), each=".<name>", help="model pools, by name (see below)"
    )
    qdrant: QdrantConfig = setting(QdrantConfig(), help="the Qdrant pool")
    embedding: EmbeddingConfig = setting(EmbeddingConfig(), help="the embedding pool")
    fallbacks: dict[str, tuple[str, ...]] = setting(
        factory=dict,
        shown="none",
        help="{model: [model, ...]}: models to try, in order, when every backend of one is down",
    )
    fallback_when_busy: frozenset[str] = setting(
        frozenset(),
        shown="none",
        help="models whose chain also serves when they are merely busy (`when_busy: true`)",
    )
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


# The sections parse() reads by their declarations alone; the others need the code below.
SIMPLE_SECTIONS: dict[str, Any] = {
    field.name: hint
    for field, _, hint in declared_fields(Config)
    if dataclasses.is_dataclass(hint) and field.name not in ("routing", "qdrant", "embedding")
}


def env_overrides() -> Iterator[tuple[str, str, str]]:
    """(ROUTER_* variable, section, key) for every key that declares one."""
    for section, _, hint in declared_fields(Config):
        if dataclasses.is_dataclass(hint):
            for field, spec, _ in declared_fields(hint):  # type: ignore[arg-type]
                if spec.env:
                    yield spec.env, section.name, field.name


ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    variable: (section, key) for variable, section, key in env_overrides()
}


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Variables override the file: their string values go into the document, converted by
    the key's type like any other value (so errors name the key, not the variable)."""
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping, got {target!r}")
        target[key] = value


def _routing(data: Any) -> RoutingConfig:
    """The routing section: its own keys, then each policy's settings from the same mapping."""
    section = Section(data, "routing")
    values = read_keys(RoutingConfig, section, {})
    policies = tuple(_policy(section, key, kind) for key, kind in policy_settings())
    section.done()
    return RoutingConfig(**values, policies=policies)


def _policy(routing: Section, key: str | None, kind: type) -> object:
    """A policy's settings: keys of `routing:` itself, or the mapping under `routing.<key>`."""
    if key is None:
        return kind(**read_keys(kind, routing, {}))
    return read(kind, routing.take(key), routing.key(key))


def _endpoints(
    raw: Any, path: str, default_name: str, inherited: Mapping[str, Any]
) -> tuple[EndpointConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list of endpoints, got {raw!r}")
    endpoints = []
    for index, item in enumerate(raw):
        name = default_name if len(raw) == 1 else f"{default_name}-{index}"
        defaults = {**inherited, "name": name}
        item = {"url": item} if isinstance(item, str) else item
        endpoints.append(read(EndpointConfig, item, f"{path}[{index}]", defaults))
    urls = [e.url for e in endpoints]
    for index, url in enumerate(urls):
        if url in urls[:index]:
            raise ConfigError(f"{path}[{index}].url: duplicate backend {url!r} in this pool")
    return tuple(endpoints)


def _inherited(values: Mapping[str, Any]) -> dict[str, Any]:
    """What an endpoint takes from its pool unless it says otherwise."""
    return {key: values[key] for key in ("weight", "max_concurrent") if key in values}


def _model(name: Any, data: Any) -> ModelConfig:
    path = f"models.{name}"
    if not isinstance(name, str) or not name or name == "auto":
        raise ConfigError(f"{path}: invalid model name {name!r}")
    section = Section(data, path)
    raw_endpoints = section.take("endpoints")
    values = read_keys(ModelConfig, section, {})
    section.done()
    url = values["url"]
    if url is not None and raw_endpoints is not None:
        raise ConfigError(f"{path}: give either url or endpoints, not both")
    if url is None and raw_endpoints is None:
        raise ConfigError(f"{path}.endpoints: missing (each model needs at least one endpoint)")
    if url is not None:
        raw_endpoints = [url]
    values["endpoints"] = _endpoints(raw_endpoints, f"{path}.endpoints", name, _inherited(values))
    if not values["endpoints"]:
        raise ConfigError(f"{path}.endpoints: empty (each model needs at least one endpoint)")
    return ModelConfig(name=name, **values)


def _models(raw: Any) -> tuple[ModelConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"models: expected a mapping of model name to settings, got {raw!r}")
    return tuple(_model(name, settings) for name, settings in raw.items())


def _service(kind: type[S], data: Any) -> S:
    name = str(next(field.default for field in dataclasses.fields(kind) if field.name == "name"))
    section = Section(data, name)
    raw_endpoints = section.take("endpoints", [])
    values = read_keys(kind, section, {})
    section.done()
    values["endpoints"] = _endpoints(raw_endpoints, f"{name}.endpoints", name, _inherited(values))
    return kind(**values)


def _fallbacks(data: Any, models: list[str]) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """`{model: [model, ...]}`, or `{model: {models: [...], when_busy: true}}` for a chain that
    also takes a model's traffic when it is merely full (every backend at max_concurrent). By
    default a busy model queues for its own backends; the chain serves when it is failing."""
    section = Section(data, "fallbacks")
    chains = {}
    when_busy = set()
    for model in list(section.data):
        path = f"fallbacks.{model}"
        if model not in models:
            raise ConfigError(f"{path}: unknown model {model!r} (models: {', '.join(models)})")
        chain = section.take(model)
        if isinstance(chain, dict):
            entry = Section(chain, path)
            busy = entry.take("when_busy")
            chain = entry.take("models")
            entry.done()
            if busy is not None and not isinstance(busy, bool):
                raise ConfigError(f"{path}.when_busy: expected true or false, got {busy!r}")
            if busy:
                when_busy.add(str(model))
            path += ".models"
        if not isinstance(chain, list) or not all(isinstance(v, str) for v in chain):
            raise ConfigError(f"{path}: expected a list of strings, got {chain!r}")
        for index, target in enumerate(chain):
            if target not in models or target == model:
                raise ConfigError(
                    f"{path}[{index}]: {target!r} is not another configured model"
                    f" (models: {', '.join(models)})"
                )
        chains[str(model)] = tuple(chain)
    return chains, frozenset(when_busy)


def _check_unique_backend_names(config: Config) -> None:
    seen: dict[str, str] = {}
    groups = [(f"models.{m.name}", m.endpoints) for m in config.models]
    groups += [("qdrant", config.qdrant.endpoints), ("embedding", config.embedding.endpoints)]
    for path, endpoints in groups:
        for endpoint in endpoints:
            if endpoint.name in seen:
                raise ConfigError(
                    f"{path}: duplicate backend name {endpoint.name!r}"
                    f" (already used in {seen[endpoint.name]})"
                )
            seen[endpoint.name] = path


def parse(data: Any, environ: Mapping[str, str] | None = None, source: str = "<dict>") -> Config:
    """Validate a decoded config document (plus environment overrides) into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"<top level>: expected a mapping, got {data!r}")
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    _apply_env(data, os.environ if environ is None else environ)
    root = Section(data, "")
    sections: dict[str, Any] = {
        name: read(kind, root.take(name), name) for name, kind in SIMPLE_SECTIONS.items()
    }
    sections["routing"] = _routing(root.take("routing"))
    models = _models(root.take("models"))
    fallbacks, fallback_when_busy = _fallbacks(root.take("fallbacks"), [m.name for m in models])
    config = Config(
        **sections,
        models=models,
        qdrant=_service(QdrantConfig, root.take("qdrant")),
        embedding=_service(EmbeddingConfig, root.take("embedding")),
        fallbacks=fallbacks,
        fallback_when_busy=fallback_when_busy,
        source=source,
    )
    root.done()
    _check_unique_backend_names(config)
    return config


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
