"""The other OpenAI-compatible routes vLLM serves, routed by the model they name (issue 12),
and GET /v1/models/{id}, through the openai SDK where it has them."""

from __future__ import annotations

import aiohttp
import openai
import orjson
import pytest

from proxy.routes import MODEL_ROUTED_JSON
from simulator.cluster import Cluster


@pytest.mark.parametrize("path", MODEL_ROUTED_JSON)
async def test_a_json_route_goes_to_the_model_it_names(gateway, http, path: str) -> None:
    body = {"model": "phi-3-mini", "input": "hello", "query": "q", "documents": ["d"]}
    async with http.post(f"{gateway.url}{path}", json=body) as response:
        assert response.status == 200, await response.text()
        assert response.headers["x-router-backend"] == "phi-3-mini"
        answer = await response.json()
    assert answer == {"object": "simulated", "path": path, "served_by": "phi-3-mini"}


async def test_auto_on_another_route_gets_the_chosen_models_name(
    gateway, http, cluster: Cluster
) -> None:
    async with http.post(f"{gateway.url}/v1/rerank", json={"model": "auto", "query": "q"}) as r:
        assert r.status == 200
        chosen = r.headers["x-router-backend"]
    assert orjson.loads(cluster[chosen].behaviour.last_body)["model"] == chosen


async def test_an_audio_form_goes_to_the_model_its_form_names(gateway, cluster: Cluster) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"\x00RIFF" * 1000, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "hermes-2")
    async with aiohttp.ClientSession() as http:
        url = f"{gateway.url}/v1/audio/transcriptions"
        async with http.post(url, data=form) as response:
            assert response.status == 200
            assert response.headers["x-router-backend"] == "hermes-2"
        sent = cluster["hermes-2"].behaviour.last_body
        assert b"\x00RIFF" * 1000 in sent  # forwarded as sent
        missing = aiohttp.FormData()
        missing.add_field("file", b"x", filename="a.wav")
        async with http.post(url, data=missing) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "missing_field"


async def test_one_model_by_id_through_the_sdk(gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    model = await client.models.retrieve("hermes-2")
    assert model.id == "hermes-2" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-7")
    assert caught.value.code == "model_not_found"
    await client.close()
