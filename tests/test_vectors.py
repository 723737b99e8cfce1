"""Vector and embedding routes: the search translation, the Qdrant pass-through, embeddings."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson

from simulator.cluster import Cluster


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
