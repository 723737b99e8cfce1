"""The official openai SDK pointed at the gateway, as users run it."""

from __future__ import annotations

import asyncio

import openai
import pytest

from simulator.cluster import Cluster


async def test_sync_client(gateway) -> None:
    def call() -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        with client:
            completion = client.chat.completions.create(
                model="hermes-2", messages=[{"role": "user", "content": "Hello"}]
            )
            models = [m.id for m in client.models.list()]
        return completion.choices[0].message.content or "", ",".join(models)

    content, models = await asyncio.to_thread(call)
    assert content.startswith("[hermes-2]Hello from the simulated")
    assert models == "mixtral-8x7b,hermes-2,openchat-3.5,phi-3-mini"


async def test_async_client_and_auto_model(gateway) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        completion = await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Hello"}]
        )
        assert completion.model == "mixtral-8x7b"  # round robin starts at the first model
        assert completion.usage is not None and completion.usage.completion_tokens == 8
        embedding = await client.embeddings.create(model="embed", input=["a", "b"])
        assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 16


async def test_async_streaming_token_by_token(gateway, cluster: Cluster) -> None:
    cluster["openchat-3.5"].behaviour.token_delay = 0.02
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="openchat-3.5", stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert len(pieces) == 9  # eight tokens and the closing chunk
    assert "".join(p or "" for p in pieces).startswith("[openchat-3.5]Hello")


async def test_sdk_sees_unknown_model_as_not_found(gateway) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="gpt-17", messages=[{"role": "user", "content": "Hi"}]
            )
    assert caught.value.code == "model_not_found"
