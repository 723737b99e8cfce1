"""Property-based fuzzing of the request path through the real gateway (issue 11, item 1).

Hypothesis draws request bodies (valid and broken JSON, odd field types, deep nesting), headers
(priority, request id, routing constraints, content type) and the simulated backends'
behaviour (statuses, pauses, dropped connections, cut-off streams). Whatever it draws, a client
must never get a 500 from the gateway itself, and once every answer is in, no slot may be held
and nothing may wait in the queue (`in_flight` and `queued` back to 0); the autouse `no_leaks`
fixture then checks that no task or fd is left behind.

Hypothesis runs in a worker thread (its engine is synchronous) and hands each request to the
event loop that serves the gateway; the examples are derandomised so CI runs the same cases.
"""

from __future__ import annotations

import asyncio
import string
from collections import Counter
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.cluster import Cluster
from tests.conftest import MODELS, StartGateway, config_document

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/vectors/search")
BACKENDS = (*MODELS, "embedding-gpu0", "embedding-gpu1", "qdrant-primary", "qdrant-secondary")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what orjson handles
    | st.floats(allow_nan=False)
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A request body that is mostly right, with some fields drawn from anything."""
    document: dict[str, Any] = {}
    names = st.sampled_from([None, "auto", *MODELS, "unknown-model"])
    document["model"] = draw(st.one_of(names, names, names, json_values))
    if draw(st.booleans()):
        document["stream"] = draw(st.booleans() | json_values)
    hello = st.just([{"role": "user", "content": "Hello"}])
    document["messages"] = draw(st.one_of(hello, hello, st.lists(json_values, max_size=3)))
    document["input"] = draw(st.text(max_size=20) | json_values)
    document["query_vector"] = draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=4)
        | json_values
    )
    document["collection"] = draw(st.sampled_from(["documents", "", "a/b", "x" * 300]))
    if draw(st.booleans()):
        document["routing"] = draw(st.fixed_dictionaries({"max_cost": json_values}) | json_values)
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    body = orjson.dumps({**extra, **document})
    if draw(st.integers(0, 4)) == 0:  # readable by orjson, sometimes too deep to write back
        depth = draw(st.integers(200, 400))
        body = b'{"deep": ' + b"[" * depth + b"]" * depth + b", " + body[1:]
    return body


header_text = st.text(alphabet=string.ascii_letters + string.digits + " -_.", max_size=40)
bodies = st.one_of(documents(), documents(), st.binary(max_size=64), json_values.map(orjson.dumps))
requests = st.fixed_dictionaries(
    {
        "route": st.sampled_from(ROUTES),
        "body": bodies,
        "headers": st.fixed_dictionaries(
            {},
            optional={
                "X-Priority": st.sampled_from(["high", "low", "urgent", ""]) | header_text,
                "X-Request-ID": header_text,
                "X-Router-Max-Cost": st.sampled_from(["0.001", "-1", "nan", "abc"]),
                "X-Router-Min-Quality": st.sampled_from(["0.7", "2", "x"]),
                "Content-Type": st.sampled_from(["application/json", "text/plain"]),
            },
        ),
        # One backend misbehaves during the request, or all of them do.
        "backend": st.sampled_from([*BACKENDS, "all"]),
        "behaviour": st.fixed_dictionaries(
            {},
            optional={
                "status": st.sampled_from([200, 400, 404, 429, 500, 502, 503, 504]),
                "latency": st.sampled_from([0.0, 0.05]),
                "drop": st.booleans(),
                "drop_after_chunks": st.sampled_from([None, 0, 2]),
                "retry_after": st.sampled_from([None, 0.01]),
            },
        ),
    }
)


async def test_no_request_gets_a_gateway_500_or_leaves_a_slot_behind(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(
        config_document(
            cluster,
            routing={"max_concurrent_requests": 8, "request_timeout": 2, "idle_timeout": 2},
            queue={"timeout": 2},
            fallbacks={"mixtral-8x7b": ["hermes-2", "openchat-3.5"]},
            circuit_breaker={"threshold": 1000},  # every example sees every backend
        )
    )
    admission = gateway.runtime.admission
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def exchange(example: dict[str, Any]) -> int:
            names = BACKENDS if example["backend"] == "all" else (example["backend"],)
            for name in names:
                cluster[name].behaviour.update(example["behaviour"])
            try:
                async with http.post(
                    gateway.url + example["route"],
                    data=example["body"],
                    headers=example["headers"],
                ) as response:
                    body = await response.read()
                    if response.status == 500:
                        # A backend's own 500 is passed through; the gateway's never.
                        assert response.headers.get("x-router-backend") not in (None, "none"), body
                        assert b"internal_error" not in body, body
                    status = response.status
            finally:
                for name in names:
                    cluster[name].behaviour.reset()
            for _ in range(100):  # the slot is given back after the last byte went out
                if admission.in_flight == 0 and admission.queued == 0:
                    break
                await asyncio.sleep(0.01)
            assert (admission.in_flight, admission.queued) == (0, 0), example
            return status

        @settings(
            max_examples=500,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests)
        def run(example: dict[str, Any]) -> None:
            future = asyncio.run_coroutine_threadsafe(exchange(example), loop)
            seen.append(future.result(timeout=30))

        await asyncio.to_thread(run)

    print("statuses:", sorted(Counter(seen).items()))
    assert len(seen) >= 500
    assert {s // 100 for s in seen} >= {2, 4}  # the draws reached answers and refusals
