"""The request path: parse what routing needs -> select -> forward -> relay, with failover.

Bodies are forwarded byte for byte unless the gateway must change them (a model chosen for
`"model": "auto"`, a vector search translated for Qdrant).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from health.passive import is_failure_status
from proxy.config import Config
from proxy.errors import (
    REQUEST_ID,
    BadGateway,
    GatewayTimeout,
    InvalidRequest,
    ModelNotFound,
    NoBackendAvailable,
)
from proxy.forward import client_response_headers, upstream_request_headers
from proxy.router import Router
from proxy.streaming import relay
from proxy.upstream import Pool, Upstream

# Bodies up to this size that arrive with a Content-Length are read whole and sent with one
# write; anything else (SSE, chunked, large) is relayed chunk by chunk.
BUFFER_LIMIT = 1 << 20
# aiohttp adds these when absent; a proxy must send only what the client sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Content-Type")
QDRANT_PREFIX = "/qdrant"
MAX_REQUEST_ID_LENGTH = 200


class UpstreamUnreachable(BadGateway):
    """Nothing reached the backend, so another backend may safely take the request."""

    code = "backend_unreachable"


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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Gateway:
    """Route handlers over one Router and one long-lived upstream ClientSession."""

    def __init__(self, config: Config, router: Router) -> None:
        self.config = config
        self.router = router
        self.session: aiohttp.ClientSession | None = None
        self._max_attempts = config.retry.max_retries + 1
        self._request_timeout = config.routing.request_timeout
        self._id_prefix = os.urandom(4).hex() + "-"
        self._ids = itertools.count(1)
        created = int(time.time())
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": model.name,
                        "object": "model",
                        "created": created,
                        "owned_by": "request-router",
                        "capabilities": list(model.capabilities),
                        "specializations": list(model.specializations),
                    }
                    for model in config.models
                ],
            }
        )
        self._model_names = ", ".join(m.name for m in config.models)

    async def start(self) -> None:
        pool = self.config.connection_pool
        connector = aiohttp.TCPConnector(
            limit=pool.limit,
            limit_per_host=pool.limit_per_host,
            keepalive_timeout=pool.keepalive_timeout,
            ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.routing.connect_timeout,
                sock_read=self._request_timeout,
            ),
            auto_decompress=False,  # relay the bytes as the backend encoded them
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
            skip_auto_headers=SKIP_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def request_id(self, request: web.Request) -> str:
        given = request.headers.get("X-Request-ID")
        if given and len(given) <= MAX_REQUEST_ID_LENGTH:
            request_id = given
        else:
            request_id = self._id_prefix + str(next(self._ids))
        request[REQUEST_ID] = request_id
        return request_id

    # --- OpenAI-compatible routes -------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "/v1/chat/completions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, "/v1/completions")

    async def _completion(self, request: web.Request, path: str) -> web.StreamResponse:
        request_id = self.request_id(request)
        body = await request.read()
        document = parse_object(body)
        stream = document.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidRequest(f"'stream' must be a boolean, got {stream!r}", code="invalid_type")
        model = document.get("model")
        if model is None or model == "auto":
            return await self._forward(
                request, self.router.auto, path, body, request_id, choose_model=document
            )
        if not isinstance(model, str):
            raise InvalidRequest(f"'model' must be a string, got {model!r}", code="invalid_type")
        pool = self.router.models.get(model)
        if pool is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist. Available models: {self._model_names}"
                " (or 'auto')."
            )
        return await self._forward(request, pool, path, body, request_id)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        request_id = self.request_id(request)
        body = await request.read()
        document = parse_object(body)
        if "input" not in document:
            raise InvalidRequest("'input' is required", code="missing_field")
        return await self._forward(
            request, self.router.embedding, "/v1/embeddings", body, request_id
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.models_body, content_type="application/json")

    # --- vector routes ------------------------------------------------------------------------

    async def vector_search(self, request: web.Request) -> web.StreamResponse:
        """`{"query_vector", "collection", "limit"}` -> Qdrant's points/search on the pool."""
        request_id = self.request_id(request)
        document = parse_object(await request.read())
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
        return await self._forward(
            request, self.router.qdrant, path, orjson.dumps(search), request_id
        )

    async def qdrant_passthrough(self, request: web.Request) -> web.StreamResponse:
        """The whole Qdrant REST API under /qdrant/: any method, path and query, as sent."""
        request_id = self.request_id(request)
        path = request.raw_path[len(QDRANT_PREFIX) :] or "/"
        if not path.startswith("/"):
            path = "/" + path
        body = await request.read()
        return await self._forward(request, self.router.qdrant, path, body, request_id)

    # --- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        pool: Pool,
        path: str,
        body: bytes,
        request_id: str,
        choose_model: dict[str, Any] | None = None,
    ) -> web.StreamResponse:
        """Try backends of `pool` until one answers. Only a backend that could not be reached
        is replaced by another: then nothing was sent, so even a POST is safe to resend."""
        headers = upstream_request_headers(request, request_id)
        tried: list[Upstream] = []
        failure: UpstreamUnreachable | None = None
        for _ in range(self._max_attempts):
            upstream = pool.select(tried)
            if upstream is None:
                break
            data = body
            if choose_model is not None:
                data = orjson.dumps({**choose_model, "model": upstream.model})
            try:
                return await self._attempt(request, upstream, path, data, headers, request_id)
            except UpstreamUnreachable as exc:
                tried.append(upstream)
                failure = exc
        if failure is not None:
            raise failure
        raise NoBackendAvailable(
            f"no backend in pool '{pool.name}' can take the request now"
            " (all are busy, unhealthy or have an open circuit)"
        )

    async def _attempt(
        self,
        request: web.Request,
        upstream: Upstream,
        path: str,
        data: bytes,
        headers: CIMultiDict[str],
        request_id: str,
    ) -> web.StreamResponse:
        assert self.session is not None
        upstream.active += 1
        upstream.requests += 1
        upstream.breaker.on_dispatch()
        try:
            try:
                response = await self.session.request(
                    request.method,
                    URL(upstream.url + path, encoded=True),
                    data=data or None,
                    headers=headers,
                    allow_redirects=False,
                )
            except aiohttp.ClientConnectorError as exc:
                self._failed(upstream)
                raise UpstreamUnreachable(
                    f"backend '{upstream.name}' is unreachable: {exc.strerror or exc}"
                ) from None
            except aiohttp.ConnectionTimeoutError:
                self._failed(upstream)
                raise UpstreamUnreachable(
                    f"backend '{upstream.name}' did not accept a connection in time"
                ) from None
            except TimeoutError:
                self._failed(upstream)
                raise GatewayTimeout(
                    f"backend '{upstream.name}' sent no response within {self._request_timeout:g}s"
                ) from None
            except aiohttp.ClientError as exc:
                self._failed(upstream)
                raise BadGateway(f"backend '{upstream.name}' failed: {exc!r}") from None
            return await self._respond(request, upstream, response, request_id)
        finally:
            upstream.active -= 1

    async def _respond(
        self,
        request: web.Request,
        upstream: Upstream,
        response: aiohttp.ClientResponse,
        request_id: str,
    ) -> web.StreamResponse:
        clean = True
        try:
            if is_failure_status(response.status):
                self._failed(upstream)
            else:
                upstream.breaker.record_success()
            headers = client_response_headers(response.headers, upstream.name, request_id)
            length = response.content_length
            if length is not None and length <= BUFFER_LIMIT:
                try:
                    payload = await response.read()
                except TimeoutError:
                    clean = False
                    raise GatewayTimeout(
                        f"backend '{upstream.name}' stalled while sending its response"
                    ) from None
                except aiohttp.ClientError as exc:
                    clean = False
                    raise BadGateway(
                        f"backend '{upstream.name}' broke off its response: {exc!r}"
                    ) from None
                return web.Response(
                    status=response.status, reason=response.reason, body=payload, headers=headers
                )
            relayed, clean = await relay(request, response, headers)
            return relayed
        finally:
            response.release()
            if not clean:
                self._failed(upstream)

    @staticmethod
    def _failed(upstream: Upstream) -> None:
        upstream.failures += 1
        upstream.breaker.record_failure()
