"""GET /api/v1/router/cluster: the workers of this host and the gateway hosts sharing Redis,
with their generation, last sync and what they hold."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster.worker_share import WorkerShare
from proxy.jsonbody import json_bytes
from proxy.runtime import LiveRuntime

HostsReport = Callable[[], Awaitable[dict[str, Any]]]


class ClusterReport:
    def __init__(
        self,
        live: LiveRuntime,
        share: WorkerShare | None,
        generation: Callable[[], int],
    ) -> None:
        self.live = live
        self.share = share
        self.generation = generation
        # Set by the Redis sync when the redis: section is on: hosts and Redis's state.
        self.hosts: HostsReport | None = None

    async def report(self, request: web.Request) -> web.Response:
        runtime = self.live.runtime
        if self.share is not None:
            workers = self.share.workers()
        else:
            workers = [
                {
                    "worker": 0,
                    "pid": os.getpid(),
                    "alive": True,
                    "generation": self.generation(),
                    "last_sync_ms_ago": None,
                    "in_flight": runtime.admission.in_flight,
                    "spend": round(runtime.telemetry.cost_total, 6),
                }
            ]
        document: dict[str, Any] = {
            "generation": self.generation(),
            "strategy": runtime.router.strategy,
            "workers": workers,
            "shared": {
                "in_flight": runtime.admission.in_flight
                + (
                    runtime.admission.shared_in_flight.elsewhere()
                    if runtime.admission.shared_in_flight is not None
                    else 0
                ),
                "spend": round(runtime.spent(), 6),
            },
            "redis": await self.hosts() if self.hosts is not None else {"enabled": False},
        }
        return web.Response(body=json_bytes(document), content_type="application/json")

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/api/v1/router/cluster", self.report)]
