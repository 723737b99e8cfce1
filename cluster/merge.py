"""How the reports of several worker processes become one: by rules each report declares, never
by guessing from key names.

Workers exchange a report's snapshot (the raw figures: counters, states, latency samples) and
the answer is rendered from the merged snapshot, so a share is computed from summed counts and
a percentile from the merged samples, never averaged.

A `Schema` is a nested dict: its leaves are rules (`Rule`, or the same words as plain strings)
or TypedDicts whose fields carry their rule as `Annotated` metadata (the snapshots of the
breaker, the upstream and the queue declare theirs beside their state, importing nothing from
here); the key "*" stands for any key (a pool, backend or model name). A field without a rule
makes `merge` raise `UndeclaredField`, so adding a field to a report forces a decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, get_args, get_origin, get_type_hints, is_typeddict

from aiohttp import web

from proxy.jsonbody import json_bytes


class Rule(StrEnum):
    SUM = "sum"  # counters, and rates of counters
    MAX = "max"
    MIN = "min"
    WORST = "worst"  # the most severe state (SEVERITY)
    LATEST = "latest"  # ISO-8601 times
    FIRST = "first"  # configuration, the same in every worker: the first worker's (not None)
    UNION = "union"  # lists, in first-seen order
    ANY = "any"
    ALL = "all"
    SAMPLES = "samples"  # raw samples, concatenated; percentiles are computed after merging


SEVERITY = {
    "closed": 0,
    "healthy": 0,
    "ready": 0,
    "half_open": 1,
    "degraded": 1,
    "draining": 1,
    "open": 2,
    "unhealthy": 2,
    "circuit_open": 2,
}

Schema = Mapping[str, object]  # str -> Rule | rule word | TypedDict | Schema
Node = Rule | dict[str, "Node"]


class UndeclaredField(Exception):
    """A report field with no merge rule: declare one where the report is built."""


def compile_schema(schema: object, where: str = "schema") -> Node:
    """Rules as a tree of dicts with `Rule` leaves; fails at once on an unknown rule word or
    a TypedDict field without one."""
    if isinstance(schema, str):
        try:
            return Rule(schema)
        except ValueError:
            raise ValueError(f"{where}: unknown merge rule {schema!r}") from None
    if is_typeddict(schema):
        return _typed_rules(schema)
    if isinstance(schema, Mapping):
        return {key: compile_schema(sub, f"{where}.{key}") for key, sub in schema.items()}
    raise TypeError(f"{where}: not a merge rule, TypedDict or mapping: {schema!r}")


def _typed_rules(typed: Any) -> Node:
    rules: dict[str, Node] = {}
    for name, hint in get_type_hints(typed, include_extras=True).items():
        where = f"{typed.__name__}.{name}"
        if get_origin(hint) is Annotated:
            rules[name] = compile_schema(get_args(hint)[1], where)
        elif is_typeddict(hint):
            rules[name] = _typed_rules(hint)
        else:
            raise UndeclaredField(f"{where} declares no merge rule")
    return rules


def merge(documents: Sequence[Any], schema: Node, path: str = "") -> Any:
    """One document from several workers' snapshots of the same report, field by field."""
    if isinstance(schema, Rule):
        return _apply(schema, documents, path)
    present = [d for d in documents if d is not None]
    if not present:
        return None
    keys: dict[str, None] = {}
    for document in present:
        if not isinstance(document, dict):
            raise TypeError(f"{path or 'document'}: expected an object, got {document!r}")
        keys.update(dict.fromkeys(document))
    merged: dict[str, Any] = {}
    for key in keys:
        node = schema.get(key, schema.get("*"))
        where = f"{path}.{key}" if path else key
        if node is None:
            raise UndeclaredField(f"{where} has no merge rule")
        merged[key] = merge([d[key] for d in present if key in d], node, where)
    return merged


def _apply(rule: Rule, documents: Sequence[Any], path: str) -> Any:
    values = [d for d in documents if d is not None]
    if not values:
        return None
    if rule is Rule.SUM:
        return sum(values)
    if rule is Rule.MAX:
        return max(values)
    if rule is Rule.MIN:
        return min(values)
    if rule is Rule.LATEST:
        return max(values, key=datetime.fromisoformat)
    if rule is Rule.WORST:
        unknown = [v for v in values if v not in SEVERITY]
        if unknown:
            raise ValueError(f"{path}: no severity for state {unknown[0]!r}")
        return max(values, key=SEVERITY.__getitem__)
    if rule is Rule.ANY:
        return any(values)
    if rule is Rule.ALL:
        return all(values)
    if rule is Rule.UNION:
        return list(dict.fromkeys(item for value in values for item in value))
    if rule is Rule.SAMPLES:
        return [sample for value in values for sample in value]
    return values[0]  # Rule.FIRST


Snapshot = dict[str, Any]


class MergedReport:
    """An admin read that answers for the whole gateway in multi-worker mode.

    `snapshot` gathers this worker's figures; `render` turns figures (this worker's, or every
    worker's merged by `schema`) into the answer; `status` picks its HTTP status. A sibling's
    question is answered with the bare snapshot (cluster.peers)."""

    __slots__ = ("snapshot", "render", "schema", "status")

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        render: Callable[[Snapshot], dict[str, Any]],
        schema: Schema,
        status: Callable[[dict[str, Any]], int] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.render = render
        self.schema = compile_schema(schema)
        self.status = status

    async def handle(self, request: web.Request) -> web.Response:
        return self.respond(self.snapshot())

    def respond(self, snapshot: Snapshot, extra: dict[str, Any] | None = None) -> web.Response:
        document = self.render(snapshot)
        if extra:
            document.update(extra)
        return web.Response(
            body=json_bytes(document),
            status=self.status(document) if self.status is not None else 200,
            content_type="application/json",
        )

    def merged(self, snapshots: Sequence[Snapshot]) -> Snapshot:
        result: Snapshot = merge(snapshots, self.schema)
        return result


def merged_report(request: web.Request) -> MergedReport | None:
    """The report behind the route `request` matched, if it is one."""
    owner = getattr(request.match_info.handler, "__self__", None)
    return owner if isinstance(owner, MergedReport) else None
