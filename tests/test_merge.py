"""Merging workers' reports by declared rules (cluster.merge): each rule, the refusal of an
undeclared field, and every merged endpoint's real snapshot."""

from __future__ import annotations

from typing import Annotated, TypedDict

import orjson
import pytest

from circuit.snapshot import BreakerSnapshot
from cluster.merge import MergedReport, Rule, UndeclaredField, compile_schema, merge
from config.schema import parse
from proxy.app import build_app
from simulator.cluster import Cluster
from tests.conftest import config_document

MERGED_PATHS = {
    "/api/v1/router/metrics",
    "/api/v1/router/history",
    "/api/v1/router/health",
    "/api/v1/router/state",
    "/api/v1/router/backends",
    "/models/status",
    "/v1/admin/models/stats",
    "/routing/load",
    "/routing/circuit-breaker/status",
    "/routing/performance",
    "/health",
}


def breaker(state: str, trips: int, last_failure: str | None) -> BreakerSnapshot:
    return {
        "state": state,
        "failure_count": trips * 5,
        "trips": trips,
        "slow_requests": 0,
        "open_for_s": None if state == "closed" else 60.0,
        "last_failure": last_failure,
    }


def test_each_rule() -> None:
    schema = compile_schema(
        {
            "count": Rule.SUM,
            "peak": "max",
            "floor": "min",
            "state": "worst",
            "seen": "latest",
            "limit": "first",
            "names": "union",
            "any": "any",
            "all": "all",
            "latency": "samples",
        }
    )
    documents = [
        {
            "count": 2,
            "peak": 1.5,
            "floor": 3,
            "state": "closed",
            "seen": "2023-11-14T22:13:20Z",
            "limit": None,
            "names": ["a", "b"],
            "any": False,
            "all": True,
            "latency": [0.1],
        },
        {
            "count": 3,
            "peak": 0.5,
            "floor": 1,
            "state": "half_open",
            "seen": "2023-11-14T22:13:20.500000Z",  # later, though it sorts first as text
            "limit": 10,
            "names": ["b", "c"],
            "any": True,
            "all": False,
            "latency": [0.2, 0.3],
        },
    ]
    assert merge(documents, schema) == {
        "count": 5,
        "peak": 1.5,
        "floor": 1,
        "state": "half_open",
        "seen": "2023-11-14T22:13:20.500000Z",
        "limit": 10,
        "names": ["a", "b", "c"],
        "any": True,
        "all": False,
        "latency": [0.1, 0.2, 0.3],
    }


def test_breaker_snapshots_merge_by_their_declared_rules() -> None:
    schema = compile_schema({"*": BreakerSnapshot})
    merged = merge(
        [
            {"hermes-2": breaker("closed", 1, "2023-11-14T22:13:20Z")},
            {
                "hermes-2": breaker("open", 2, "2023-11-14T22:13:21Z"),
                "phi": breaker("closed", 0, None),
            },
        ],
        schema,
    )
    assert merged["hermes-2"] == breaker("open", 3, "2023-11-14T22:13:21Z") | {"failure_count": 10}
    assert merged["phi"] == breaker("closed", 0, None)


def test_a_field_without_a_rule_is_refused() -> None:
    schema = compile_schema({"pools": {"*": {"active": Rule.SUM}}})
    with pytest.raises(UndeclaredField, match=r"pools\.qdrant\.queued"):
        merge([{"pools": {"qdrant": {"active": 1, "queued": 2}}}], schema)
    with pytest.raises(ValueError, match="unknown merge rule 'average'"):
        compile_schema({"latency": "average"})

    class Loose(TypedDict):
        declared: Annotated[int, "sum"]
        forgotten: int

    with pytest.raises(UndeclaredField, match=r"Loose\.forgotten"):
        compile_schema({"x": Loose})
    with pytest.raises(ValueError, match="no severity for state 'on_fire'"):
        merge(["closed", "on_fire"], Rule.WORST)


def merged_reports(cluster: Cluster) -> dict[str, MergedReport]:
    app = build_app(parse(config_document(cluster), {}))
    reports = {}
    for route in app.router.routes():
        owner = getattr(route.handler, "__self__", None)
        if isinstance(owner, MergedReport):
            reports[route.resource.canonical] = owner
    return reports


async def test_every_merged_report_declares_every_field(cluster: Cluster) -> None:
    reports = merged_reports(cluster)
    assert set(reports) == MERGED_PATHS
    for path, report in reports.items():
        snapshot = report.snapshot()
        sibling = orjson.loads(orjson.dumps(snapshot))  # as it crosses the Unix socket
        merged = report.merged([snapshot, sibling])  # raises on an undeclared field
        single = orjson.loads(report.respond(snapshot).body)
        response = report.respond(merged)
        assert response.status == 200, path
        both = orjson.loads(response.body)
        assert both.keys() == single.keys(), path


async def test_merged_percentiles_come_from_merged_samples_not_averages(
    cluster: Cluster,
) -> None:
    report = merged_reports(cluster)["/api/v1/router/metrics"]
    fast, slow = report.snapshot(), orjson.loads(orjson.dumps(report.snapshot()))
    fast["latency"] = [0.010] * 90  # this worker: p50 = p99 = 10 ms
    slow["latency"] = [1.0] * 10  # that one: p50 = p99 = 1000 ms
    fast["backends"]["hermes-2"]["requests"] = 3
    slow["backends"]["phi-3-mini"]["requests"] = 1
    fast["total_requests"], slow["total_requests"] = 90, 10
    document = orjson.loads(report.respond(report.merged([fast, slow])).body)
    routing = document["routing_metrics"]
    # Over the 100 samples of both: not (10 + 1000) / 2 = 505 ms.
    assert routing["p50_response_time_ms"] == 10.0
    assert routing["p99_response_time_ms"] == 1000.0
    assert routing["avg_response_time_ms"] == 109.0  # weighted by samples, not per worker
    assert routing["total_requests"] == 100
    distribution = document["load_balancing"]["backend_distribution"]
    assert distribution["hermes-2"] == {"requests": 3, "percentage": 75.0}
    assert distribution["phi-3-mini"] == {"requests": 1, "percentage": 25.0}
