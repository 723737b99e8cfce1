"""The data-plane routes: OpenAI-compatible, vector search and the Qdrant pass-through.

Each adapter only validates what routing needs and builds the call (pool, path, body); the
forwarding itself is proxy.forward's. Bodies are forwarded byte for byte unless the gateway must
change them (a model chosen for `"model": "auto"`, a vector search translated for Qdrant).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import StreamReader, web

from admission.constraints import has_constraint_headers, routing_request
from proxy.errors import (
    REQUEST_ID,
    InvalidRequest,
    ModelNotFound,
    RequestTimeout,
    UnsupportedCoding,
)
from proxy.forward import forward
from proxy.mirror import is_qdrant_write, start_copies
from proxy.rewrite import ModelTemplate, serialise
from proxy.runtime import LiveRuntime, Runtime
from proxy.state import RequestState

QDRANT_PREFIX = "/qdrant"
ROUTING_KEYS = ("model", "stream")
VECTOR_ROUTE = "/api/v1/vectors/search"


async def read_some(content: StreamReader, timeout: float) -> bytes:
    """The next part of a body that did not come whole with its head; 408 (and the connection
    closed) when the client goes silent for `timeout` seconds (nginx's client_body_timeout)."""
    if not timeout:
        return await content.readany()
    try:
        async with asyncio.timeout(timeout):
            return await content.readany()
    except TimeoutError:
        raise RequestTimeout(f"the request body went silent for {timeout:g}s") from None


async def read_body(request: web.Request, body_timeout: float = 0.0) -> bytes:
    """The request body, up to the body size limit. Not `request.read()`: that copies the body
    twice and keeps it on the request, which aiohttp keeps alive with its connection until
    the next request arrives (an idle client would hold its last upload)."""
    coding = request.headers.get("Transfer-Encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        # aiohttp reads `gzip, chunked` as plain chunked: the body would pass still coded.
        raise UnsupportedCoding(f"Transfer-Encoding {coding!r} is not supported; use chunked")
    content = request.content
    limit = request.client_max_size
    if content.is_eof():  # all of it came with the headers: the usual small JSON request
        body = content.read_nowait()
        size = len(body)
    else:
        chunks = []
        size = 0
        while chunk := await read_some(content, body_timeout):
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        body = b"".join(chunks)
    if size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    return body


def parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(document, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, got {type(document).__name__}",
            code="invalid_json",
        )
    return document


def repeated_routing_key(body: bytes) -> str | None:
    """A routing key ("model", "stream") given twice at the top level, or None. orjson keeps
    the last, a backend may read the first: the request is refused rather than guessed. The
    byte count is the cheap test; only a body naming a key twice anywhere is parsed again."""
    count = body.count
    if count(b'"model"') < 2 and count(b'"stream"') < 2:
        return None
    suspects = [key for key in ROUTING_KEYS if count(b'"%s"' % key.encode()) > 1]
    top: list[list[str]] = []

    def keys_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top.append([key for key, _ in pairs])  # innermost first: the last is the top level
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=keys_of)
    except (ValueError, RecursionError):
        raise InvalidRequest("request body nests too deeply", code="invalid_json") from None
    names = top[-1] if top else []
    return next((key for key in suspects if names.count(key) > 1), None)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def request_id(runtime: Runtime, request: web.Request) -> str:
    """The id this request goes by (also on its error answers, through the middleware)."""
    given = runtime.new_request_id(request.headers.get("X-Request-ID"))
    request[REQUEST_ID] = given
    return given


# OpenAI-compatible routes vLLM serves besides chat and completions, each naming its model:
# JSON bodies (routed and, for "auto" or a fallback, rewritten like chat) and multipart forms.
MODEL_ROUTED_JSON = (
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/score",
    "/tokenize",
    "/detokenize",
    "/v1/audio/speech",
)
MODEL_ROUTED_FORMS = ("/v1/audio/transcriptions", "/v1/audio/translations")

FORM_FIELD = re.compile(
    rb'Content-Disposition:[^\r\n]*\bname="([^"]*)"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)\r\n',
    re.IGNORECASE,
)


def unknown_model(runtime: Runtime, model: str, also: str = "") -> ModelNotFound:
    """OpenAI's 404 for a model the gateway does not serve, listing those it does."""
    return ModelNotFound(
        f"The model '{model}' does not exist. Available models: {runtime.model_names}{also}."
    )


def form_field(body: bytes, name: bytes) -> str | None:
    """A small text field of a multipart/form-data body, without parsing the whole body (an
    audio file can be megabytes): the first part named `name`."""
    for match in FORM_FIELD.finditer(body):
        if match[1] == name:
            value = match[2].decode("utf-8", "replace").strip()
            return value or None
    return None


class Routes:
    """Route handlers over the live runtime: each reads the runtime once and keeps it."""

    def __init__(self, live: LiveRuntime) -> None:
        self.live = live

    # --- OpenAI-compatible routes -------------------------------------------------------------

    async def completion(self, request: web.Request, path: str) -> web.StreamResponse:
        """POST /v1/chat/completions, /v1/completions and the other JSON routes that name their
        model (MODEL_ROUTED_JSON), registered with their path bound."""
        runtime = self.live.runtime
        rid = request_id(runtime, request)
        body = await read_body(request, runtime.body_timeout)
        document = parse_object(body)
        repeated = repeated_routing_key(body)
        if repeated is not None:
            raise InvalidRequest(f"'{repeated}' is given twice", code="duplicate_key")
        stream = document.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest(f"'stream' must be a boolean, got {stream!r}", code="invalid_type")
        router = runtime.router
        model = document.get("model")
        auto = model is None or model == "auto"
        if auto:
            pool = router.auto
        elif not isinstance(model, str):
            raise InvalidRequest(f"'model' must be a string, got {model!r}", code="invalid_type")
        else:
            found = router.models.get(model)
            if found is None:
                raise unknown_model(runtime, model, " (or 'auto')")
            pool = found
        routing = None
        if pool.uses_request or "routing" in document or has_constraint_headers(request):
            routing = routing_request(request, document, bool(stream))
            if "routing" in document:  # ours, not the backend's: strip it
                del document["routing"]
                body = serialise(document)
        fallbacks = () if auto else router.fallbacks.get(pool.name, ())
        state = RequestState(
            rid,
            pool,
            path,
            body,
            document if fallbacks or pool.renames else None,
            ModelTemplate(document) if auto else None,  # refused here if it cannot be written
            bool(stream),
            fallbacks,
            None,
            routing,
        )
        return await forward(runtime, request, state)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        runtime = self.live.runtime
        rid = request_id(runtime, request)
        body = await read_body(request, runtime.body_timeout)
        document = parse_object(body)
        if "input" not in document:
            raise InvalidRequest("'input' is required", code="missing_field")
        state = RequestState(rid, runtime.router.embedding, "/v1/embeddings", body)
        return await forward(runtime, request, state)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.live.runtime.models_body, content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one model object, or OpenAI's 404 for an unknown one."""
        runtime = self.live.runtime
        model = request.match_info["model"]
        body = runtime.model_bodies.get(model)
        if body is None:
            raise unknown_model(runtime, model)
        return web.Response(body=body, content_type="application/json")

    async def model_form(self, request: web.Request, path: str) -> web.StreamResponse:
        """Multipart routes that name their model in a form field (/v1/audio/transcriptions,
        /v1/audio/translations): routed to that model's pool, the body forwarded as sent (a
        multipart body is not rewritten, so the model must be named, not "auto")."""
        runtime = self.live.runtime
        rid = request_id(runtime, request)
        body = await read_body(request, runtime.body_timeout)
        model = form_field(body, b"model")
        if model is None:
            raise InvalidRequest("the form field 'model' is required", code="missing_field")
        pool = runtime.router.models.get(model)
        if pool is None:
            raise unknown_model(runtime, model)
        state = RequestState(rid, pool, path, body)
        return await forward(runtime, request, state)

    # --- vector routes ------------------------------------------------------------------------

    async def vector_search(self, request: web.Request) -> web.StreamResponse:
        """`{"query_vector", "collection", "limit"}` -> Qdrant's points/search on the pool."""
        runtime = self.live.runtime
        rid = request_id(runtime, request)
        document = parse_object(await read_body(request, runtime.body_timeout))
        vector = document.get("query_vector")
        if not isinstance(vector, list) or not vector or not all(map(_is_number, vector)):
            raise InvalidRequest(
                "'query_vector' must be a non-empty list of numbers", code="invalid_vector"
            )
        collection = document.get("collection")
        if not isinstance(collection, str) or not collection:
            raise InvalidRequest("'collection' must be a non-empty string", code="missing_field")
        limit = document.get("limit", 10)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidRequest(
                f"'limit' must be a positive integer, got {limit!r}", code="invalid_type"
            )
        search: dict[str, Any] = {
            "vector": vector,
            "limit": limit,
            "with_payload": document.get("with_payload", True),
        }
        for key in ("filter", "score_threshold", "offset", "with_vector", "params"):
            if key in document:
                search[key] = document[key]
        path = f"/collections/{quote(collection, safe='')}/points/search"
        state = RequestState(
            rid, runtime.router.qdrant, path, serialise(search), None, None, False, (), VECTOR_ROUTE
        )
        return await forward(runtime, request, state)

    async def qdrant_passthrough(self, request: web.Request) -> web.StreamResponse:
        """The whole Qdrant REST API under /qdrant/: any method, path and query, as sent."""
        runtime = self.live.runtime
        rid = request_id(runtime, request)
        path = request.raw_path[len(QDRANT_PREFIX) :] or "/"
        if not path.startswith("/"):
            path = "/" + path
        body = await read_body(request, runtime.body_timeout)
        router = runtime.router
        pool = router.qdrant
        copies: list[asyncio.Task[bool]] = []
        if router.qdrant_writes != "any" and is_qdrant_write(request.method, path):
            pool = router.qdrant_primary
            if router.qdrant_writes == "all":
                copies = start_copies(runtime, request, router.qdrant_replicas, path, body, rid)
        state = RequestState(rid, pool, path, body, None, None, False, (), QDRANT_PREFIX)
        if not copies:
            return await forward(runtime, request, state)
        try:
            return await forward(runtime, request, state)
        finally:
            # The connection takes its next request once every replica has the write.
            await asyncio.gather(*copies, return_exceptions=True)
