"""Multi-worker coordination: N worker processes share the listening port (SO_REUSEPORT); each
also listens on a Unix socket in a shared run directory, for its siblings only.

- Admin changes (strategy swap, reload) are applied by the worker that got them and then sent
  to every sibling before the answer goes out, so all workers agree within a second.
- Admin reads (metrics, health, state, model status, Prometheus) are answered for the whole
  gateway: the worker asks its siblings for their snapshot of the report and merges it with
  its own by the rules the report declares (cluster.merge), then renders the answer.
  Prometheus's `/metrics` is merged by cluster.metrics_merge, whose ledger in the run
  directory keeps merged counters from going backwards when a worker restarts or is late.
Requests between siblings carry a secret header so they are applied or answered locally, never
passed on again. Health and breaker state stay per worker; the merged reads show the worst.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from cluster.merge import MergedReport, merged_report
from cluster.metrics_merge import PID_HEADER, CounterLedger, Exposition, merged_exposition
from proxy.handler_types import Handler, Middleware
from proxy.jsonbody import json_bytes

log = logging.getLogger("request_router.peers")

PEER_HEADER = "X-Router-Peer"
PEER_TIMEOUT = 1.0  # the spec: a change reaches every worker within one second
# Admin changes every worker applies, by route (its pattern: a backend's name varies).
BROADCAST = {
    ("PUT", "/api/v1/router/strategy"),
    ("POST", "/api/v1/router/reload"),
    ("PUT", "/api/v1/router/backends/{name}/state"),
}


def route_of(request: web.Request) -> tuple[str, str | None]:
    """(method, the matched route's pattern): None for a request no route matched."""
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else None


class Peers:
    def __init__(self, run_dir: str, index: int, total: int, secret: str) -> None:
        self.run_dir = Path(run_dir)
        self.index = index
        self.total = total
        self.secret = secret
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._ledger = CounterLedger(self.run_dir)
        self._pid = os.getpid()

    @classmethod
    def from_environment(cls) -> Peers | None:
        run_dir = os.environ.get("ROUTER_RUN_DIR")
        if not run_dir:
            return None
        return cls(
            run_dir,
            int(os.environ["ROUTER_WORKER_INDEX"]),
            int(os.environ["ROUTER_WORKERS_TOTAL"]),
            os.environ["ROUTER_PEER_SECRET"],
        )

    def socket_path(self, index: int) -> str:
        return str(self.run_dir / f"worker-{index}.sock")

    def siblings(self) -> list[int]:
        return [i for i in range(self.total) if i != self.index]

    def _session(self, index: int) -> aiohttp.ClientSession:
        session = self._sessions.get(index)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path(index)),
                timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT),
            )
            self._sessions[index] = session
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    async def ask(
        self, index: int, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes] | None:
        try:
            async with self._session(index).request(
                method,
                f"http://worker{path}",
                data=body or None,
                headers={**headers, PEER_HEADER: self.secret},
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("worker %d did not answer %s %s: %r", index, method, path, exc)
            return None

    async def ask_all(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> list[tuple[int, bytes] | None]:
        return await asyncio.gather(
            *(self.ask(i, method, path, body, headers) for i in self.siblings())
        )

    def middleware(self) -> Middleware:
        @web.middleware
        async def coordinate(request: web.Request, handler: Handler) -> web.StreamResponse:
            report = merged_report(request) if request.method == "GET" else None
            if request.headers.get(PEER_HEADER) == self.secret:
                # A sibling's question: answer locally; a report, as its bare snapshot.
                if report is not None:
                    return web.Response(
                        body=json_bytes(report.snapshot()), content_type="application/json"
                    )
                response = await handler(request)
                if request.path == "/metrics":
                    response.headers[PID_HEADER] = str(self._pid)
                return response
            if route_of(request) in BROADCAST:
                return await self._broadcast(request, handler)
            if report is not None:
                return await self._merged(request, report)
            if request.method == "GET" and request.path == "/metrics":
                return await self._merged_prometheus(request, handler)
            return await handler(request)

        return coordinate

    async def _broadcast(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        response = await handler(request)
        if response.status == 200:
            forwarded = {
                k: v
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "content-type")
            }
            answers = await self.ask_all(request.method, request.path_qs, body, forwarded)
            applied = 1 + sum(1 for a in answers if a is not None and a[0] == 200)
            response.headers["x-router-workers-applied"] = f"{applied}/{self.total}"
        return response

    async def _merged(self, request: web.Request, report: MergedReport) -> web.Response:
        snapshots = [report.snapshot()]
        # The token, when reads need it (admin.reads: token), is the siblings' to check too.
        credentials = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        answers = await self.ask_all("GET", request.path_qs, b"", credentials)
        snapshots += [orjson.loads(a[1]) for a in answers if a is not None and a[0] == 200]
        return report.respond(
            report.merged(snapshots),
            {"workers": {"reporting": len(snapshots), "total": self.total}},
        )

    async def _merged_prometheus(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Every worker's exposition merged (cluster.metrics_merge); the parsing and the
        ledger's locked file update run in a thread, off this worker's event loop."""
        # This worker's own answer in the text format the merge parses; the merged one is
        # rendered in whichever format the scraper asked for.
        plain = {k: v for k, v in request.headers.items() if k.lower() != "accept"}
        local = await handler(request.clone(headers=plain))
        if not isinstance(local, web.Response) or not isinstance(local.body, bytes):
            return local
        if local.status != 200:
            return local
        own = Exposition(self.index, self._pid, local.body.decode())
        answers = await asyncio.gather(*(self._exposition(i) for i in self.siblings()))
        body, content_type = await asyncio.to_thread(
            merged_exposition,
            [own, *(a for a in answers if a is not None)],
            self.total,
            self._ledger,
            request.headers.get("Accept", ""),
        )
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _exposition(self, index: int) -> Exposition | None:
        """A sibling's exposition with its pid (the ledger tells a restart by it)."""
        try:
            async with self._session(index).get(
                "http://worker/metrics", headers={PEER_HEADER: self.secret}
            ) as response:
                if response.status != 200:
                    log.warning("worker %d answered /metrics with %d", index, response.status)
                    return None
                return Exposition(index, int(response.headers[PID_HEADER]), await response.text())
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            log.warning("worker %d did not answer /metrics: %r", index, exc)
            return None
