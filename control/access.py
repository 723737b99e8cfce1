"""Who may use which route, decided in one middleware before any handler runs (issue 11,
items 5 and 6).

Each route is of one kind, declared where the app is composed (proxy.app):

- DATA: the proxied API. With `auth.api_keys` set it needs one of those keys (Bearer or
  X-API-Key; 401 otherwise, as LiteLLM answers), and the key's client name becomes the
  request's identity, which the per-client rate limit keys on. Not served on the admin listener.
- PUBLIC: `/health*` and `/metrics`, for load balancers and scrapers: anyone, on any listener.
- READ: admin state and reports (strategy, backends, state, the report and routing APIs), and
  PAGE, the dashboard's page (it holds no state: what it shows it reads from READ routes).
- WRITE: admin changes (strategy, reload, chaos).

An admin request (READ, PAGE, WRITE) is checked in this order; Caddy's admin endpoint is the
model (caddy/admin.go: checkHost against the listener's own names, checkOrigin, and its
`/load` takes JSON bodies only):

1. Origin: a browser request whose Origin is not the host it was sent to comes from another
   site's page: 403.
2. A bearer token, when one is configured and sent, decides alone: right, or 401 and counted
   against the peer; after `admin.max_token_failures` in a minute the peer gets 429 for the
   rest of the minute, whatever it sends (a right guess must not be confirmed either).
3. Otherwise the rule of the route on this listener: writes need the token when one is set,
   else a local peer; reads follow `admin.reads` (open, local, token), and on the main port
   they are at least local once `admin.listen` gives the admin plane its own listener.
   A local peer is a loopback (or Unix socket) peer that did not come through a proxy.
4. Access granted by the peer's place needs a Host that names this listener (localhost,
   127.0.0.1, [::1], the listen address or `admin.hosts`, with the listener's port): a page
   that rebinds its own name to 127.0.0.1 sends its own name (DNS rebinding). Unix sockets are
   exempt (browsers cannot reach them and DNS plays no part, as in Caddy).
5. Writes take a JSON body (Content-Type application/json), or no body and an Authorization
   header; a cross-site form or "simple" fetch can send neither without a CORS preflight,
   which this API never grants: 415.

Refused writes, bad tokens and the start of a throttle are written to the audit log.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from admission.ratelimit import CLIENT
from config.schema import Config
from control.audit import AuditLog
from proxy.errors import Forbidden, GatewayError, InvalidRequest, RateLimited, Unauthorized
from proxy.runtime import LiveRuntime

FAILURE_WINDOW = 60.0  # seconds bad admin tokens are counted over
MAX_THROTTLED_PEERS = 10_000  # least recently failing peers are forgotten beyond this
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})
ADMIN_REALM = {"WWW-Authenticate": 'Bearer realm="request-router admin"'}
CLIENT_REALM = {"WWW-Authenticate": 'Bearer realm="request-router"'}


class Kind(enum.Enum):
    DATA = "data"
    PUBLIC = "public"
    READ = "read"
    PAGE = "page"
    WRITE = "write"


class Rule(enum.Enum):
    """Who a route admits without a token, weakest first."""

    OPEN = "open"  # anyone who reaches the listener
    LOCAL = "local"  # local peers (and token holders)
    TOKEN = "token"  # token holders only; local peers when no token is configured


class UnsupportedMediaType(InvalidRequest, status=415, code="unsupported_media_type"):
    """An admin change whose body is not JSON."""


class NotOnThisListener(InvalidRequest, status=404, code="not_found"):
    """A proxied-API route asked of the admin listener."""


class TooManyTokenFailures(RateLimited, code="too_many_token_failures"):
    """A peer that sent too many bad admin tokens in the last minute."""


@dataclass(frozen=True, slots=True)
class Listener:
    """One socket the app is served on, as the rules see it."""

    admin: bool
    port: int | None  # None: a Unix socket
    names: frozenset[str]  # host names a Host header may give (the port must be `port`)
    wildcard: bool  # bound to every interface: anyone routed here may connect


def listener_names(host: str) -> tuple[frozenset[str], bool]:
    host = host.strip("[]").lower()
    wildcard = host in WILDCARDS
    return LOOPBACK_NAMES | ({host} if not wildcard else set()), wildcard


def split_host(value: str, default_port: int) -> tuple[str | None, int | None]:
    """`name:port` (or `[v6]:port`) -> (lowercase name, port); (None, None) if malformed."""
    try:
        parts = urlsplit(f"//{value}")
        return parts.hostname, parts.port or default_port
    except ValueError:
        return None, None


def is_local_peer(request: web.BaseRequest) -> bool:
    """A loopback or Unix socket peer that did not come through a proxy: a reverse proxy on
    the same host makes every client look local, so a forwarded request never is."""
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        return False
    peer = request.remote
    if not peer:  # a Unix socket (None or ""): local by construction
        return True
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def bearer(request: web.BaseRequest) -> str | None:
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class TokenFailures:
    """Bad admin tokens per peer over the last minute, from an injected clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.peers: OrderedDict[str, deque[float]] = OrderedDict()
        self.throttled = 0

    def __repr__(self) -> str:
        return f"<TokenFailures {len(self.peers)} peers, {self.throttled} throttled>"

    def retry_after(self, peer: str, limit: int) -> float:
        """Seconds until `peer` may try a token again; 0.0 when it may now."""
        failures = self._recent(peer)
        if not limit or failures is None or len(failures) < limit:
            return 0.0
        return failures[-limit] + FAILURE_WINDOW - self._clock()

    def failed(self, peer: str) -> int:
        """Count one bad token; the peer's failures within the window."""
        failures = self._recent(peer)
        if failures is None:
            failures = self.peers[peer] = deque(maxlen=64)
            if len(self.peers) > MAX_THROTTLED_PEERS:
                self.peers.popitem(last=False)
        self.peers.move_to_end(peer)
        failures.append(self._clock())
        return len(failures)

    def _recent(self, peer: str) -> deque[float] | None:
        failures = self.peers.get(peer)
        if failures is None:
            return None
        horizon = self._clock() - FAILURE_WINDOW
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures


class ClientKeys:
    """auth.api_keys, looked up by the key's SHA-256 (a dict probe on a digest tells a timing
    observer nothing about the key)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clients = {digest(key): name for name, key in config.auth.api_keys}

    def identify(self, request: web.BaseRequest) -> str:
        """The client name of the request's key; Unauthorized when it has none that matches."""
        key = bearer(request) or request.headers.get("X-API-Key")
        client = self.clients.get(digest(key)) if key else None
        if client is None:
            problem = "an unknown API key" if key else "no API key"
            raise Unauthorized(
                f"this gateway needs an API key: 'Authorization: Bearer <key>' or"
                f" 'X-API-Key: <key>'; the request has {problem}",
                code="invalid_api_key",
                headers=CLIENT_REALM,
            )
        return client


class AccessControl:
    """The route kinds, the listeners and the rules above; `check()` applies them."""

    def __init__(
        self, live: LiveRuntime, audit: AuditLog, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.live = live
        self.audit = audit
        self.failures = TokenFailures(clock)
        self.kinds: dict[tuple[str, str], Kind] = {}
        self.route_kinds: dict[object, Kind] = {}  # the same, by route object: one lookup
        self.listeners: dict[str | int, Listener] = {}
        self.main_port: int | None = None  # where the proxied API is served, once known
        self.admin_listening = False  # a separate admin listener is open
        self._keys = ClientKeys(live.runtime.config)

    def add(self, app: web.Application, kind: Kind, routes: Iterable[web.RouteDef]) -> None:
        """Register `routes` on `app` as routes of `kind`."""
        for route in routes:
            for registered in route.register(app.router):
                self.route_kinds[registered] = kind
                method = registered.method
                self.kinds[(registered.resource.canonical, method)] = kind  # type: ignore[union-attr]
                if method == "GET":
                    self.kinds[(registered.resource.canonical, "HEAD")] = kind  # type: ignore[union-attr]

    def listening(self, address: Any, *, admin: bool, host: str) -> None:
        """A socket the runner now serves (`address`: its getsockname()): the admin listener,
        or the main one. Unregistered sockets count as the main listener's."""
        key = address if isinstance(address, str) else address[1]
        names, wildcard = listener_names(host)
        port = None if isinstance(address, str) else address[1]
        self.listeners[key] = Listener(admin, port, names, wildcard)
        self.admin_listening = self.admin_listening or admin
        if not admin and port is not None:
            self.main_port = port

    def listener(self, request: web.BaseRequest) -> Listener:
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(local, tuple | list) and len(local) >= 2:
            known = self.listeners.get(local[1])
            if known is not None:
                return known
            names, wildcard = listener_names(self.live.runtime.config.server.host)
            return Listener(False, local[1], names, wildcard)
        if isinstance(local, str) and local in self.listeners:
            return self.listeners[local]
        return Listener(False, None, frozenset(), False)  # a Unix socket: the workers' channel

    def data_port(self, request: web.BaseRequest) -> int | None:
        """The port the proxied API answers on, for requests the gateway sends itself."""
        listener = self.listener(request)
        return listener.port if not listener.admin and listener.port else self.main_port

    def kind(self, request: web.BaseRequest) -> Kind:
        route = request.match_info.route  # type: ignore[attr-defined]
        kind = self.route_kinds.get(route)
        if kind is not None:  # a route registered here (not aiohttp's implicit HEAD of a GET)
            return kind
        resource = route.resource
        if resource is None:  # no route: 404 or 405, answered by aiohttp
            return Kind.PUBLIC
        return self.kinds.get((resource.canonical, request.method), Kind.DATA)

    def check(self, request: web.Request) -> None:
        """Raise the refusal for `request`, or return: called by the error middleware before
        the handler, so it costs no coroutine frame of its own. The proxied API's usual case,
        with no admin listener and no client keys configured, is a route lookup and two
        reads."""
        kind = self.kind(request)
        if kind is Kind.DATA:
            self.check_data_route(request)
        elif kind is not Kind.PUBLIC:
            try:
                self.check_admin(request, kind)
            except GatewayError as exc:
                if kind is Kind.WRITE:
                    self.record_refusal(request, exc)
                raise

    # -- the proxied API ------------------------------------------------------------------

    def check_data_route(self, request: web.Request) -> None:
        """`check()` for a route known to be of the proxied API (proxy.server.DataPlane):
        with no admin listener and no client keys configured, two reads."""
        if self.admin_listening or self.live.runtime.config.auth.api_keys:
            self.check_data(request)

    def check_data(self, request: web.Request) -> None:
        if self.listener(request).admin:
            raise NotOnThisListener(
                f"{request.method} {request.path} is not served on the admin listener"
            )
        config = self.live.runtime.config
        if not config.auth.api_keys:
            return
        if self._keys.config is not config:  # reloaded: the keys may have changed
            self._keys = ClientKeys(config)
        request[CLIENT] = self._keys.identify(request)

    # -- the admin plane ------------------------------------------------------------------

    def check_admin(self, request: web.Request, kind: Kind) -> None:
        config = self.live.runtime.config
        listener = self.listener(request)
        self.check_origin(request, listener)
        token = config.server.admin_token
        given = bearer(request) if token else None
        if given is not None and token is not None:
            self.check_token(request, kind, given, token, config.admin.max_token_failures)
        else:
            self.check_place(request, self.rule(kind, listener, config), token, listener)
        if kind is Kind.WRITE:
            self.check_body(request)

    def rule(self, kind: Kind, listener: Listener, config: Config) -> Rule:
        if kind is Kind.WRITE:
            return Rule.TOKEN
        reads = Rule(config.admin.reads)
        if reads is Rule.OPEN and config.admin.listen and not listener.admin:
            reads = Rule.LOCAL  # the admin plane has its own listener: the main port is data
        if kind is Kind.PAGE and reads is Rule.TOKEN:
            reads = Rule.LOCAL  # a browser cannot send a token to load a page
        return reads

    def check_origin(self, request: web.Request, listener: Listener) -> None:
        """A browser's cross-site request: its Origin is not the host it was sent to."""
        origin = request.headers.get("Origin")
        if origin is None or listener.port is None:
            return
        try:
            parts = urlsplit(origin)
            default = 443 if parts.scheme == "https" else 80
            same = (parts.hostname, parts.port or default) == split_host(request.host, default)
        except ValueError:
            same = False
        if not same or parts.scheme not in ("http", "https"):
            raise Forbidden(
                f"admin requests from another site's page are refused (Origin {origin!r},"
                f" Host {request.host!r})",
                code="origin_not_allowed",
            )

    def check_token(
        self, request: web.Request, kind: Kind, given: str, token: str, limit: int
    ) -> None:
        peer = request.remote or "local"
        wait = self.failures.retry_after(peer, limit)
        if wait > 0:
            raise TooManyTokenFailures(
                f"too many bad admin tokens from {peer}; retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if hmac.compare_digest(digest(given), digest(token)):
            return
        failures = self.failures.failed(peer)
        exc = Unauthorized("the admin token is wrong", headers=ADMIN_REALM)
        if failures == limit:
            self.failures.throttled += 1
            exc = Unauthorized(
                f"the admin token is wrong; {peer} is refused for a minute after {limit} bad"
                " tokens",
                headers=ADMIN_REALM,
            )
        if kind is not Kind.WRITE:  # refused writes are recorded by the middleware
            self.record_refusal(request, exc)
        raise exc

    def check_place(
        self, request: web.Request, rule: Rule, token: str | None, listener: Listener
    ) -> None:
        local = is_local_peer(request)
        if rule is Rule.OPEN:
            if local or not listener.wildcard:  # Caddy checks Host unless bound to all
                self.check_host(request, listener)
            return
        if rule is Rule.TOKEN and token:
            raise Unauthorized(
                "admin endpoints need 'Authorization: Bearer <ROUTER_ADMIN_TOKEN>'",
                headers=ADMIN_REALM,
            )
        if not local:
            if token:
                raise Unauthorized(
                    "admin endpoints need 'Authorization: Bearer <ROUTER_ADMIN_TOKEN>' from"
                    " a peer that is not local",
                    headers=ADMIN_REALM,
                )
            raise Forbidden(
                "admin requests are accepted only from loopback when no ROUTER_ADMIN_TOKEN is set"
            )
        self.check_host(request, listener)

    def check_host(self, request: web.Request, listener: Listener) -> None:
        """The Host must name this listener: a DNS-rebinding page sends its own name."""
        if listener.port is None:
            return
        name, port = split_host(request.host, 80)
        names = listener.names | {h.lower() for h in self.live.runtime.config.admin.hosts}
        if name not in names or port != listener.port:
            raise Forbidden(
                f"host not allowed: {request.host!r} (this listener answers admin requests"
                f" for {', '.join(sorted(names))} on port {listener.port}; see admin.hosts)",
                code="host_not_allowed",
            )

    def check_body(self, request: web.Request) -> None:
        if is_json(request.headers.get("Content-Type", "")):
            return
        if not request.body_exists and "Authorization" in request.headers:
            return
        raise UnsupportedMediaType(
            "admin changes take a JSON body: send 'Content-Type: application/json'"
            " (a change without a body: that header, or Authorization)"
        )

    def record_refusal(self, request: web.Request, exc: GatewayError) -> None:
        route = request.match_info.route
        action = route.name or f"{request.method} {request.path}"
        self.audit.record(request, action, accepted=False, reason=exc.message)
