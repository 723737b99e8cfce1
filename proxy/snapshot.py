"""What a backend's report says, and how several workers' reports of it merge.

Kept apart from the code that fills it: the request path's modules are compiled (native.py),
and a compiled module's TypedDict keeps its fields' types but not their `Annotated` merge
rules, which cluster.merge reads."""

from __future__ import annotations

from typing import Annotated, TypedDict

from circuit.snapshot import BreakerSnapshot


class UpstreamSnapshot(TypedDict):
    """One backend as every report shows it. Annotations: how the snapshots of the same
    backend in several worker processes merge (cluster.merge). Configuration is the same in
    every worker; counters add up; health takes the least healthy view."""

    name: Annotated[str, "first"]
    url: Annotated[str, "first"]
    pool: Annotated[str, "first"]
    model: Annotated[str | None, "first"]
    weight: Annotated[float, "first"]
    active: Annotated[int, "sum"]
    max_concurrent: Annotated[int, "first"]  # for the gateway: the workers share the count
    requests: Annotated[int, "sum"]
    failures: Annotated[int, "sum"]
    healthy: Annotated[bool, "all"]
    last_check: Annotated[str | None, "latest"]  # ISO-8601 UTC
    response_time_ms: Annotated[float | None, "max"]  # of the last health check
    cooling_down: Annotated[bool, "any"]  # a 429's Retry-After has not passed yet
    admin_state: Annotated[str, "first"]  # ready | drain | maint (the admin API's)
    breaker: BreakerSnapshot
