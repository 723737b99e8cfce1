"""A Qdrant-like vector search server and an OpenAI-compatible embeddings server.

Vectors are derived from a hash of the input, so the same text always embeds the same way and
tests can check what came back without a real model.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import orjson
from aiohttp import web

from simulator.behaviour import Behaviour, control_routes, json_response, misbehaviour_middleware

EMBEDDING_DIMENSIONS = 16


def embed(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest() * (dimensions * 4 // 32 + 1)
    raw = struct.unpack(f"<{dimensions}I", digest[: dimensions * 4])
    return [round(v / 0xFFFFFFFF * 2 - 1, 6) for v in raw]


def build_embedding_app(name: str, behaviour: Behaviour | None = None) -> web.Application:
    behaviour = behaviour if behaviour is not None else Behaviour()
    app = web.Application(middlewares=[misbehaviour_middleware(behaviour)])

    async def embeddings(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(behaviour.last_body)
            inputs = body["input"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return json_response({"error": {"message": "expected {input: ...}"}}, 400)
        texts = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs]
        tokens = sum(len(t.split()) for t in texts)
        return json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": embed(t)}
                    for i, t in enumerate(texts)
                ],
                "model": body.get("model") or name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def health(request: web.Request) -> web.Response:
        return json_response({"status": "ok", "server": name})

    app.add_routes(
        [
            web.post("/v1/embeddings", embeddings),
            web.get("/health", health),
            *control_routes(behaviour),
        ]
    )
    return app


COLLECTIONS = web.AppKey("collections", dict[str, dict[str, Any]])


def add_collection(app: web.Application, name: str) -> None:
    """A collection the simulated Qdrant `app` answers for, as PUT /collections/{name} makes."""
    app[COLLECTIONS][name] = {"vectors": {"size": EMBEDDING_DIMENSIONS}}


def build_qdrant_app(name: str, behaviour: Behaviour | None = None) -> web.Application:
    behaviour = behaviour if behaviour is not None else Behaviour()
    app = web.Application(middlewares=[misbehaviour_middleware(behaviour)])
    collections: dict[str, dict[str, Any]] = {}
    app[COLLECTIONS] = collections
    add_collection(app, "documents")

    def ok(result: object) -> web.Response:
        return json_response({"result": result, "status": "ok", "time": 0.0001})

    def hits(collection: str, vector: list[float], limit: int) -> list[dict[str, Any]]:
        norm = sum(abs(v) for v in vector) or 1.0
        return [
            {
                "id": i,
                "version": 0,
                "score": round(1.0 - i * 0.1 - 0.01 / norm, 6),
                "payload": {"server": name, "collection": collection, "rank": i},
            }
            for i in range(limit)
        ]

    def missing(collection: str) -> web.Response | None:
        if collection in collections:
            return None
        return json_response(
            {"status": {"error": f"Collection `{collection}` doesn't exist!"}}, 404
        )

    async def search(request: web.Request) -> web.Response:
        """The classic search API: {"vector", "limit"} -> a list of scored points."""
        collection = request.match_info["collection"]
        if (refusal := missing(collection)) is not None:
            return refusal
        try:
            body = orjson.loads(behaviour.last_body)
            vector = body["vector"]
            limit = int(body.get("limit", 10))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return json_response({"status": {"error": "expected {vector, limit}"}}, 400)
        if isinstance(vector, dict):
            vector = vector.get("vector", [])
        return ok(hits(collection, vector, limit))

    async def query(request: web.Request) -> web.Response:
        """The universal query API (qdrant-client's query_points): {"query", "limit"}."""
        collection = request.match_info["collection"]
        if (refusal := missing(collection)) is not None:
            return refusal
        try:
            body = orjson.loads(behaviour.last_body)
            vector = body["query"]
            limit = int(body.get("limit", 10))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return json_response({"status": {"error": "expected {query, limit}"}}, 400)
        if isinstance(vector, dict):  # {"nearest": [...]}, as qdrant-client sends it
            vector = vector.get("nearest")
        if not isinstance(vector, list):
            return json_response({"status": {"error": "only dense vector queries"}}, 400)
        return ok({"points": hits(collection, vector, limit)})

    async def list_collections(request: web.Request) -> web.Response:
        return ok({"collections": [{"name": n} for n in collections]})

    async def get_collection(request: web.Request) -> web.Response:
        collection = request.match_info["collection"]
        if collection not in collections:
            return json_response(
                {"status": {"error": f"Collection `{collection}` doesn't exist!"}}, 404
            )
        return ok({"status": "green", "config": collections[collection], "points_count": 10})

    async def create_collection(request: web.Request) -> web.Response:
        collections[request.match_info["collection"]] = orjson.loads(behaviour.last_body or b"{}")
        return ok(True)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="healthz check passed")

    async def root(request: web.Request) -> web.Response:
        return json_response({"title": f"qdrant simulator {name}", "version": "1.12.0"})

    app.add_routes(
        [
            web.get("/", root),
            web.get("/healthz", healthz),
            web.get("/collections", list_collections),
            web.get("/collections/{collection}", get_collection),
            web.put("/collections/{collection}", create_collection),
            web.post("/collections/{collection}/points/search", search),
            web.post("/collections/{collection}/points/query", query),
            *control_routes(behaviour),
        ]
    )
    return app
