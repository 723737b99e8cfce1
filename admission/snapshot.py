"""What the admission queue's report says, and how several workers' reports of it merge.

Kept apart from the code that fills it: the request path's modules are compiled (native.py),
and a compiled module's TypedDict keeps its fields' types but not their `Annotated` merge
rules, which cluster.merge reads."""

from __future__ import annotations

from typing import Annotated, TypedDict


class AdmissionSnapshot(TypedDict):
    """The queue as every report shows it. Annotations: how the snapshots of several worker
    processes merge (cluster.merge): each worker has its own queue and limits, so counts and
    rates add up while the configured limits are the same in every worker."""

    in_flight: Annotated[int, "sum"]
    max_in_flight: Annotated[int, "first"]  # for the gateway: the workers share the count
    queued: Annotated[int, "sum"]
    queue_size: Annotated[int, "first"]  # per worker
    drain_rate_per_s: Annotated[float, "sum"]
    rejected_full: Annotated[int, "sum"]
    timed_out: Annotated[int, "sum"]
    abandoned: Annotated[int, "sum"]
