"""What a breaker's report says, and how several workers' reports of it merge.

Kept apart from the code that fills it: the request path's modules are compiled (native.py),
and a compiled module's TypedDict keeps its fields' types but not their `Annotated` merge
rules, which cluster.merge reads."""

from __future__ import annotations

from typing import Annotated, TypedDict


class BreakerSnapshot(TypedDict):
    """One breaker as every report shows it. Each field's annotation says how the snapshots of
    the same backend's breaker in several worker processes merge (cluster.merge): the most
    alarming view wins, and trips add up (each worker's breaker trips on its own)."""

    state: Annotated[str, "worst"]
    failure_count: Annotated[int, "max"]  # consecutive failures
    trips: Annotated[int, "sum"]  # times it opened
    slow_requests: Annotated[int, "max"]  # within the slow window (adaptive mode)
    open_for_s: Annotated[float | None, "max"]  # length of this open period; None when closed
    last_failure: Annotated[str | None, "latest"]  # ISO-8601 UTC
