"""An OpenAI-compatible model server: chat and text completions, streamed or not."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.routes import MODEL_ROUTED_FORMS, MODEL_ROUTED_JSON
from simulator.behaviour import (
    Behaviour,
    abort_connection,
    control_routes,
    json_response,
    misbehaviour_middleware,
)

WORDS = (
    "Hello",
    " from",
    " the",
    " simulated",
    " model",
    ",",
    " one",
    " token",
    " at",
    " a",
    " time",
    ".",
)


def completion_tokens(model: str, count: int) -> list[str]:
    tokens = [f"[{model}]"]
    while len(tokens) < count:
        tokens.append(WORDS[(len(tokens) - 1) % len(WORDS)])
    return tokens[:count]


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        text = str(body.get("prompt", ""))
    return max(1, len(text.split()))


def build_model_app(model: str, behaviour: Behaviour | None = None) -> web.Application:
    behaviour = behaviour if behaviour is not None else Behaviour()
    app = web.Application(middlewares=[misbehaviour_middleware(behaviour)])

    async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(behaviour.last_body or await request.read())
        except orjson.JSONDecodeError:
            return json_response({"error": {"message": "bad json", "type": "invalid_request"}}, 400)
        if not isinstance(body, dict):
            return json_response({"error": {"message": "expected object", "type": "invalid"}}, 400)
        tokens = completion_tokens(model, behaviour.tokens)
        if behaviour.token_bytes:
            tokens = [t.ljust(behaviour.token_bytes, ".") for t in tokens]
        prompt_tokens = _prompt_tokens(body)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{behaviour.requests}"
        if not body.get("stream"):
            text = "".join(tokens)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            return json_response(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None) -> bytes:
            if chat:
                choice = {
                    "index": 0,
                    "delta": {} if delta is None else {"content": delta},
                    "finish_reason": finish,
                }
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            event = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            return b"data: " + orjson.dumps(event) + b"\n\n"

        sent = 0
        for index, token in enumerate(tokens):
            if index and behaviour.token_delay:
                await asyncio.sleep(behaviour.token_delay)
            if behaviour.drop_after_chunks is not None and sent >= behaviour.drop_after_chunks:
                abort_connection(request)
                return response
            await response.write(chunk(token, None))
            sent += 1
        await response.write(chunk(None, "stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            final = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, chat=False)

    async def models(request: web.Request) -> web.Response:
        return json_response(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 0, "owned_by": "simulator"}],
            }
        )

    async def health(request: web.Request) -> web.Response:
        return json_response({"status": "ok", "model": model})

    async def other(request: web.Request) -> web.Response:
        """vLLM's other model-named routes (responses, messages, rerank, score, tokenize,
        audio): an answer that says who served which route, enough for routing tests."""
        return json_response({"object": "simulated", "path": request.path, "served_by": model})

    app.add_routes(
        [
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.get("/v1/models", models),
            web.get("/health", health),
            *(web.post(path, other) for path in (*MODEL_ROUTED_JSON, *MODEL_ROUTED_FORMS)),
            *control_routes(behaviour),
        ]
    )
    return app
