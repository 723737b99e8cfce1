"""Membership: who this process is among the members, what its heartbeat says of it, and
what the last sync saw of all of them (the live count limits fall back by, and the cluster
report's members and hosts).

Each sync is a heartbeat into a sorted set scored with Redis's own clock (hosts' clocks may
differ; Redis's is the one they share), with the member's host, port, pid, generation and
totals; a member is live while its heartbeat is younger than `redis.member_ttl`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import orjson

from circuit.breaker import iso_utc
from cluster.redis_metrics import RedisMetrics
from proxy.runtime import Runtime


@dataclass(frozen=True)
class Member:
    """Who this process is among the members: what the report shows of it."""

    host: str
    port: int
    worker: int
    pid: int

    @property
    def id(self) -> str:
        return f"{self.host}:{self.port}:{self.worker}:{self.pid}"

    @classmethod
    def this_process(cls, port: int, worker: int) -> Member:
        return cls(socket.gethostname(), port, worker, os.getpid())


def heartbeat(member: Member, generation: int, runtime: Runtime) -> dict[str, Any]:
    """What this member tells the others about itself with every sync."""
    telemetry = runtime.telemetry
    return {
        "host": member.host,
        "port": member.port,
        "worker": member.worker,
        "pid": member.pid,
        "generation": generation,
        "requests": telemetry.total,
        "spend": telemetry.cost_total,
        "tokens": sum(s.prompt_tokens + s.completion_tokens for s in telemetry.models.values()),
        "in_flight": runtime.admission.in_flight,
    }


class Membership:
    """The members the last sync saw."""

    def __init__(self, member_ttl: float, metrics: RedisMetrics) -> None:
        self.member_ttl = member_ttl
        self.metrics = metrics
        self.live = 1
        self._seen: tuple[float, list[list[str]]] = (0.0, [])  # Redis's time, members

    def read(self, now_ms: float, members: list[list[str]]) -> None:
        """The members the sync saw: counted now (limits fall back by them), described
        when the report asks."""
        ttl_ms = self.member_ttl * 1000
        self._seen = (now_ms, members)
        self.live = max(1, sum(1 for _, seen, _ in members if now_ms - float(seen) < ttl_ms))
        self.metrics.live_members = self.live

    def describe(self) -> list[dict[str, Any]]:
        now_ms, members = self._seen
        ttl_ms = self.member_ttl * 1000
        described = []
        for member, seen, raw in members:
            info = orjson.loads(raw)
            seen_ms = float(seen)
            described.append(
                {
                    "member": member,
                    **{k: info.get(k) for k in ("host", "port", "worker", "pid", "generation")},
                    "alive": now_ms - seen_ms < ttl_ms,
                    "last_heartbeat": iso_utc(seen_ms / 1000),
                    "last_heartbeat_ms_ago": round(now_ms - seen_ms),
                    **{k: info.get(k) for k in ("requests", "spend", "tokens", "in_flight")},
                }
            )
        return described


def hosts(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members grouped by gateway (host and port): its live workers, the newest
    generation among them, and their spend and requests added up."""
    grouped: dict[tuple[Any, Any], dict[str, Any]] = {}
    for member in members:
        key = (member["host"], member["port"])
        host = grouped.setdefault(
            key,
            {
                "host": member["host"],
                "port": member["port"],
                "live_workers": 0,
                "generation": 0,
                "last_heartbeat": None,
                "requests": 0,
                "spend": 0.0,
            },
        )
        host["live_workers"] += 1 if member["alive"] else 0
        host["generation"] = max(host["generation"], member["generation"] or 0)
        host["last_heartbeat"] = max(host["last_heartbeat"] or "", member["last_heartbeat"] or "")
        host["requests"] += member["requests"] or 0
        host["spend"] = round(host["spend"] + (member["spend"] or 0.0), 6)
    return list(grouped.values())
