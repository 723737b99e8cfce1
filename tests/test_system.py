"""Faults together, under load, through the real gateway (issue 11, item 2): a model that fails
while another rate-limits, and clients that leave mid-stream. The protections (breakers,
retries, shedding) must keep every other pool serving, and the failed pool must serve again
within its bound once the fault ends."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import aiohttp

from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document

BREAKER_TIMEOUT = 0.5
FAULT = (0.5, 2.0)  # seconds after the start: hermes-2 answers 503, openchat-3.5 429
RUN = 5.5
RECOVERY_BOUND = BREAKER_TIMEOUT + 2.0  # health checks are off here: the breaker decides

# (kind, body) per client request; "kind" is how results are grouped.
TRAFFIC: list[tuple[str, str, dict[str, Any]]] = [
    ("hermes-2", "/v1/chat/completions", chat("hermes-2")),
    ("phi-3-mini", "/v1/chat/completions", chat("phi-3-mini")),
    ("mixtral-8x7b", "/v1/chat/completions", chat("mixtral-8x7b", stream=True)),
    ("auto", "/v1/chat/completions", chat("auto")),
    ("embedding", "/v1/embeddings", {"input": "hello"}),
    ("qdrant", "/api/v1/vectors/search", {"query_vector": [0.1, 0.2], "collection": "documents"}),
]


async def test_one_failing_model_and_one_rate_limiting_leave_the_others_serving(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(
        config_document(
            cluster,
            circuit_breaker={"threshold": 3, "timeout": BREAKER_TIMEOUT, "half_open_limit": 1},
            load_shedding={"min_requests": 10, "failure_window": 1.0},
        )
    )
    hermes = cluster["hermes-2"].behaviour
    openchat = cluster["openchat-3.5"].behaviour
    for backend in cluster.backends.values():
        backend.behaviour.token_delay = 0.002  # tokens paced like a model
    # kind -> (sent, answered, status), in seconds since the start
    results: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    started = time.perf_counter()
    fault = [RUN, RUN]  # when it really began and ended (the loop is busy: sleeps run late)

    async def faults() -> None:
        await asyncio.sleep(FAULT[0])
        hermes.status = 503
        openchat.status, openchat.retry_after = 429, 0.2
        fault[0] = time.perf_counter() - started
        await asyncio.sleep(FAULT[1] - FAULT[0])
        hermes.status = openchat.status = 200
        openchat.retry_after = None
        fault[1] = time.perf_counter() - started

    async def client(index: int, http: aiohttp.ClientSession) -> None:
        turn = index
        while (now := time.perf_counter() - started) < RUN:
            kind, path, body = TRAFFIC[turn % len(TRAFFIC)]
            turn += 1
            async with http.post(gateway.url + path, json=body) as response:
                if body.get("stream") and index % 2:
                    await response.content.readany()  # half the clients leave mid-stream
                    response.close()
                    continue
                await response.read()
                results[kind].append((now, time.perf_counter() - started, response.status))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(faults(), *(client(i, http) for i in range(8)))

    def success(kind: str) -> float:
        answers = results[kind]
        return sum(status == 200 for _, _, status in answers) / len(answers)

    for kind in ("phi-3-mini", "mixtral-8x7b", "embedding", "qdrant"):
        assert len(results[kind]) > 50 and success(kind) >= 0.999, (kind, success(kind))
    assert success("auto") >= 0.99  # retries take auto traffic to the models that serve
    during = [s for sent, done, s in results["hermes-2"] if fault[0] < sent and done < fault[1]]
    assert during and 200 not in during  # the fault was real
    after = [s for sent, _, s in results["hermes-2"] if sent > fault[1] + RECOVERY_BOUND]
    assert after and set(after) == {200}, after  # and it ended for the clients too
    runtime = gateway.runtime
    assert (runtime.admission.in_flight, runtime.admission.queued) == (0, 0)
