"""Per-request routing inputs: constraints (headers or a `routing` object in the body), the
content and affinity key that request-aware strategies read, and the budget rule.

A constraint no model can meet is refused with 422, naming the constraint; nothing is sent.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from balancers.request import RoutingRequest
from proxy.errors import ConstraintUnsatisfiable, InvalidRequest
from proxy.upstream import Upstream

CONSTRAINT_HEADERS = {
    "X-Router-Max-Cost": "max_cost",
    "X-Router-Max-Latency-Ms": "max_latency_ms",
    "X-Router-Min-Quality": "min_quality",
    "X-Router-Request-Type": "request_type",
}
ROUTING_FIELDS = frozenset(CONSTRAINT_HEADERS.values())


def has_constraint_headers(request: web.Request) -> bool:
    # One case-insensitive set test in C, not a generator: 0.24 instead of 0.8 µs a request.
    return not request.headers.keys().isdisjoint(CONSTRAINT_HEADERS)


def constraint_number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"routing constraint '{name}' must be a number, got {value!r}",
            code="invalid_constraint",
        ) from None
    if number < 0 or number != number:
        raise InvalidRequest(
            f"routing constraint '{name}' must be >= 0, got {value!r}", code="invalid_constraint"
        )
    return number


def content_of(document: dict[str, Any]) -> str:
    """The text that says what the request is about: the last user message, or the prompt."""
    messages = document.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role", "user") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(
                        part.get("text", "")
                        for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str)
                    )
        return ""
    prompt = document.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    text = document.get("content")
    return text if isinstance(text, str) else ""


def routing_request(request: web.Request, document: dict[str, Any], stream: bool) -> RoutingRequest:
    given: dict[str, Any] = {}
    routing = document.get("routing")
    if routing is not None:
        if not isinstance(routing, dict):
            raise InvalidRequest("'routing' must be an object", code="invalid_constraint")
        unknown = set(routing) - ROUTING_FIELDS
        if unknown:
            raise InvalidRequest(
                f"unknown routing field(s) {sorted(unknown)}; known: {sorted(ROUTING_FIELDS)}",
                code="invalid_constraint",
            )
        given.update(routing)
    for header, name in CONSTRAINT_HEADERS.items():
        value = request.headers.get(header)
        if value is not None:
            given[name] = value
    request_type = given.get("request_type")
    if request_type is not None and not isinstance(request_type, str):
        raise InvalidRequest("routing 'request_type' must be a string", code="invalid_constraint")
    user = document.get("user")
    return RoutingRequest(
        request_type=request_type,
        content=content_of(document),
        affinity_key=request.headers.get("X-Session-ID")
        or (user if isinstance(user, str) else None),
        stream=stream,
        max_cost=constraint_number(given["max_cost"], "max_cost") if "max_cost" in given else None,
        max_latency_ms=(
            constraint_number(given["max_latency_ms"], "max_latency_ms")
            if "max_latency_ms" in given
            else None
        ),
        min_quality=(
            constraint_number(given["min_quality"], "min_quality")
            if "min_quality" in given
            else None
        ),
    )


def violations(upstream: Upstream, request: RoutingRequest) -> str | None:
    """The first constraint this backend breaks, or None."""
    if request.max_cost is not None and upstream.cost > request.max_cost:
        return "max_cost"
    if request.min_quality is not None and upstream.quality < request.min_quality:
        return "min_quality"
    latency = upstream.latency.value
    if (
        request.max_latency_ms is not None
        and latency is not None
        and latency * 1000 > request.max_latency_ms
    ):
        return "max_latency_ms"
    return None


def excluded_by_constraints(
    upstreams: tuple[Upstream, ...], request: RoutingRequest
) -> tuple[Upstream, ...]:
    """Backends the constraints rule out; 422 when they rule out every one."""
    if request.max_cost is None and request.min_quality is None and request.max_latency_ms is None:
        return ()
    broken = {u: violations(u, request) for u in upstreams}
    excluded = tuple(u for u, reason in broken.items() if reason is not None)
    if upstreams and len(excluded) == len(upstreams):
        raise ConstraintUnsatisfiable(_explain(upstreams, request))
    return excluded


def _explain(upstreams: tuple[Upstream, ...], request: RoutingRequest) -> str:
    if request.max_cost is not None and all(u.cost > request.max_cost for u in upstreams):
        cheapest = min(upstreams, key=lambda u: u.cost)
        return (
            f"no model satisfies max_cost={request.max_cost:g}: the cheapest is"
            f" {cheapest.model} at {cheapest.cost:g} per request"
        )
    if request.min_quality is not None and all(u.quality < request.min_quality for u in upstreams):
        best = max(upstreams, key=lambda u: u.quality)
        return (
            f"no model satisfies min_quality={request.min_quality:g}: the best is"
            f" {best.model} at {best.quality:g}"
        )
    if request.max_latency_ms is not None:
        return (
            f"no backend satisfies max_latency_ms={request.max_latency_ms:g} together with the"
            " other constraints"
        )
    return "no model satisfies the routing constraints together"
