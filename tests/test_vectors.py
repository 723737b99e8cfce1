"""Vector and embedding routes: the search translation, the Qdrant pass-through, embeddings."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import orjson
import pytest

from simulator.cluster import Cluster
from tests.conftest import StartGateway, config_document


async def test_vector_search_is_translated_to_qdrant(gateway, http, cluster: Cluster) -> None:
    body = {"query_vector": [0.1, 0.2, 0.3], "collection": "documents", "limit": 3}
    async with http.post(f"{gateway.url}/api/v1/vectors/search", json=body) as response:
        assert response.status == 200
        backend = response.headers["x-router-backend"]
        data = await response.json()
    assert backend == "qdrant-primary"
    assert [hit["id"] for hit in data["result"]] == [0, 1, 2]
    sent = orjson.loads(cluster["qdrant-primary"].behaviour.last_body)
    assert sent == {"vector": [0.1, 0.2, 0.3], "limit": 3, "with_payload": True}


async def test_vector_search_balances_over_primary_and_secondary(gateway, http) -> None:
    body = {"query_vector": [1.0], "collection": "documents"}
    counts: Counter[str] = Counter()
    for _ in range(4):
        async with http.post(f"{gateway.url}/api/v1/vectors/search", json=body) as response:
            counts[response.headers["x-router-backend"]] += 1
            assert len((await response.json())["result"]) == 10  # default limit
    assert counts == {"qdrant-primary": 2, "qdrant-secondary": 2}


async def test_vector_search_rejects_bad_input(gateway, http, cluster: Cluster) -> None:
    cases = [
        ({"collection": "documents"}, "query_vector"),
        ({"query_vector": [], "collection": "documents"}, "query_vector"),
        ({"query_vector": ["x"], "collection": "documents"}, "query_vector"),
        ({"query_vector": [1.0]}, "collection"),
        ({"query_vector": [1.0], "collection": "documents", "limit": 0}, "limit"),
    ]
    for body, field in cases:
        async with http.post(f"{gateway.url}/api/v1/vectors/search", json=body) as response:
            assert response.status == 400
            assert field in (await response.json())["error"]["message"]
    assert cluster["qdrant-primary"].behaviour.requests == 0


async def test_qdrant_rest_api_passes_through_under_prefix(gateway, http) -> None:
    async with http.put(
        f"{gateway.url}/qdrant/collections/notes", json={"vectors": {"size": 4}}
    ) as response:
        assert response.status == 200
        assert (await response.json())["result"] is True
    async with http.get(f"{gateway.url}/qdrant/collections/missing?timeout=3") as response:
        assert response.status == 404
        assert "missing" in (await response.json())["status"]["error"]
    async with http.get(f"{gateway.url}/qdrant/healthz") as response:
        assert response.status == 200
        assert await response.text() == "healthz check passed"


async def test_embeddings_route(gateway, http) -> None:
    body = {"model": "text-embed", "input": ["hello world", "bye"]}
    backends = set()
    for _ in range(2):
        async with http.post(f"{gateway.url}/v1/embeddings", json=body) as response:
            assert response.status == 200
            backends.add(response.headers["x-router-backend"])
            data = await response.json()
        assert [d["index"] for d in data["data"]] == [0, 1]
    assert backends == {"embedding-gpu0", "embedding-gpu1"}
    async with http.post(f"{gateway.url}/v1/embeddings", json={"model": "x"}) as response:
        assert response.status == 400
        assert "input" in (await response.json())["error"]["message"]


async def test_qdrant_client_works_through_the_prefix(gateway, cluster: Cluster) -> None:
    """The official qdrant-client, pointed at the gateway with prefix="qdrant"."""
    from qdrant_client import QdrantClient

    def use() -> tuple[list[str], list[float], str]:
        client = QdrantClient(
            url=gateway.url, prefix="qdrant", check_compatibility=False, timeout=5
        )
        try:
            names = [c.name for c in client.get_collections().collections]
            points = client.query_points("documents", query=[0.1, 0.2, 0.3], limit=3).points
            return names, [p.score for p in points], str(points[0].payload["server"])
        finally:
            client.close()

    names, scores, server = await asyncio.to_thread(use)
    assert names == ["documents"]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert server in {"qdrant-primary", "qdrant-secondary"}
    sent = orjson.loads(cluster[server].behaviour.last_body)
    query = sent["query"]
    assert (query.get("nearest") if isinstance(query, dict) else query) == [0.1, 0.2, 0.3]
    assert sent["limit"] == 3


async def create_then_search(http, url: str, collection: str) -> tuple[int, list[int]]:
    async with http.put(f"{url}/qdrant/collections/{collection}", json={"vectors": {}}) as r:
        created = r.status
    statuses = []
    for _ in range(4):  # round robin: both replicas
        body = {"query_vector": [0.1, 0.2, 0.3], "collection": collection}
        async with http.post(f"{url}/api/v1/vectors/search", json=body) as r:
            statuses.append(r.status)
    return created, statuses


async def has_collection(http, url: str, collection: str) -> bool:
    async with http.get(f"{url}/collections/{collection}") as response:
        return response.status == 200


@pytest.mark.parametrize(
    ("writes", "on_primary", "on_secondary"),
    [("all", True, True), ("primary", True, False)],
)
async def test_qdrant_writes_reach_every_replica_or_the_primary(
    cluster: Cluster, start_gateway: StartGateway, http, writes, on_primary, on_secondary
) -> None:
    """qdrant.writes (issue 12): by default a write goes to the primary and is copied to every
    other replica before the connection takes its next request, so a search after it finds
    the collection wherever it is served; `primary` writes to the first only."""
    document = config_document(cluster, routing={"strategy": "round_robin"})
    document["qdrant"]["writes"] = writes
    gateway = await start_gateway(document)
    for _ in range(3):  # whichever replica round robin would pick next
        created, statuses = await create_then_search(http, gateway.url, "fresh")
        assert created == 200
    assert await has_collection(http, cluster["qdrant-primary"].url, "fresh") is on_primary
    assert await has_collection(http, cluster["qdrant-secondary"].url, "fresh") is on_secondary
    assert set(statuses) == ({200} if on_secondary else {200, 404})
    assert gateway.runtime.admission.in_flight == 0


async def test_qdrant_writes_any_leave_it_to_the_balancer(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """`any` (a Qdrant cluster that replicates itself): each write to one replica only."""
    document = config_document(cluster, routing={"strategy": "round_robin"})
    document["qdrant"]["writes"] = "any"
    gateway = await start_gateway(document)
    for name in ("one", "two"):
        async with http.put(f"{gateway.url}/qdrant/collections/{name}", json={}) as r:
            assert r.status == 200
    found = [
        await has_collection(http, cluster[replica].url, name)
        for replica in ("qdrant-primary", "qdrant-secondary")
        for name in ("one", "two")
    ]
    assert found.count(True) == 2  # each on one replica, round robin: one each


async def test_a_replica_that_refuses_a_copied_write_does_not_change_the_answer(
    cluster: Cluster, start_gateway: StartGateway, http, caplog
) -> None:
    gateway = await start_gateway(config_document(cluster))
    cluster["qdrant-secondary"].behaviour.status = 500
    caplog.set_level(logging.ERROR, logger="request_router")
    async with http.put(f"{gateway.url}/qdrant/collections/fresh", json={}) as r:
        assert r.status == 200 and r.headers["x-router-backend"] == "qdrant-primary"
    assert any(
        "copied to qdrant-secondary answered 500" in record.getMessage()
        for record in caplog.records
    )
