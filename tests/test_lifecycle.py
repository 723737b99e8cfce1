"""Operations: graceful drain on SIGTERM, reload on SIGHUP and through the admin API."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest
import yaml

from circuit.breaker import BreakerState
from config.schema import load
from control.reload import HealthService, Reloader
from proxy.__main__ import environment_with, main, parse_args
from proxy.router import Router
from proxy.runtime import LiveRuntime, Runtime
from simulator.cluster import Cluster
from tests.conftest import StartGateway, chat, config_document
from tests.process import gateway_process

JSON = {"Content-Type": "application/json"}  # an admin change without a body says so


async def read_stream(http: aiohttp.ClientSession, url: str, model: str) -> list[str]:
    async with http.post(f"{url}/v1/chat/completions", json=chat(model, stream=True)) as r:
        assert r.status == 200
        return [line for line in (await r.text()).splitlines() if line]


async def test_sigterm_lets_live_streams_finish_and_refuses_new_connections(
    cluster: Cluster, tmp_path
) -> None:
    for name in ("hermes-2", "phi-3-mini"):
        cluster[name].behaviour.tokens = 10
        cluster[name].behaviour.token_delay = 0.1  # each stream lasts about a second
    async with gateway_process(config_document(cluster), tmp_path) as gateway:
        async with aiohttp.ClientSession() as http:
            streams = [
                asyncio.create_task(read_stream(http, gateway.url, model))
                for model in ("hermes-2", "phi-3-mini", "hermes-2")
            ]
            await asyncio.sleep(0.3)
            stopped_at = time.monotonic()
            gateway.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(f"{gateway.url}/health/live"):
                        pass
            results = await asyncio.gather(*streams)
        assert await asyncio.wait_for(gateway.process.wait(), 10) == 0
        assert time.monotonic() - stopped_at >= 0.6  # it waited for the streams
    for events in results:
        assert events[-1] == "data: [DONE]" and len(events) == 12


async def test_sighup_with_a_bad_config_keeps_the_running_one(cluster: Cluster, tmp_path) -> None:
    document = config_document(cluster)
    async with gateway_process(document, tmp_path) as gateway:
        async with aiohttp.ClientSession() as http:
            strategy_url = f"{gateway.url}/api/v1/router/strategy"
            gateway.write_config("routing:\n  strategy: [broken\n")
            gateway.signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with http.get(strategy_url) as response:
                assert (await response.json())["strategy"] == "round_robin"
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
            document["routing"] = {"strategy": "least_connections"}
            gateway.write_config(document)
            gateway.signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with http.get(strategy_url) as response:
                assert (await response.json())["strategy"] == "least_connections"
        gateway.signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.process.wait(), 10)
        output = await gateway.output()
    assert "reload refused, keeping the running configuration" in output
    assert "YAML syntax error" in output
    assert "configuration reloaded" in output


async def test_reload_endpoint_swaps_config_and_keeps_backend_state(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    path = tmp_path / "router.yaml"
    document = config_document(cluster, circuit_breaker={"threshold": 1, "timeout": 60})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    gateway = await start_gateway(load(path, environ={}))
    hermes = gateway.router.models["hermes-2"].upstreams[0]
    hermes.breaker.record_failure()
    assert hermes.breaker.state is BreakerState.OPEN

    document["models"].pop("openchat-3.5")
    document["routing"] = {"strategy": "weighted"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    async with http.post(f"{gateway.url}/api/v1/router/reload", headers=JSON) as response:
        assert response.status == 200
        result = await response.json()
    assert result["reloaded"] is True and result["strategy"] == "weighted"
    assert result["models"] == ["mixtral-8x7b", "hermes-2", "phi-3-mini"]
    router = gateway.runtime.router
    assert router.models["hermes-2"].upstreams[0] is hermes  # same object, same breaker
    assert hermes.breaker.state is BreakerState.OPEN
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("openchat-3.5")) as r:
        assert r.status == 404
    async with http.get(f"{gateway.url}/api/v1/router/strategy") as response:
        assert (await response.json())["strategy"] == "weighted"

    path.write_text("models: {x: {weight: -1, url: 'http://127.0.0.1:1'}}\n")
    async with http.post(f"{gateway.url}/api/v1/router/reload", headers=JSON) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "invalid_config" and "models.x.weight" in error["message"]
    assert gateway.runtime.router is router


async def test_reload_without_a_file_is_refused(gateway, http) -> None:
    async with http.post(f"{gateway.url}/api/v1/router/reload", headers=JSON) as response:
        assert response.status == 400
        assert "no config file" in (await response.json())["error"]["message"]


async def test_a_reload_keeps_runtime_strategies_and_command_line_settings(
    cluster: Cluster, tmp_path
) -> None:
    """Issue 12: a reload in demo mode turned chaos off, reset the strategy set through the
    admin API and reported a host change that was the command line's. Now the command line and
    --demo are ROUTER_* variables a reload reads the file with, and a strategy set at runtime
    stays unless the file changes the strategy."""
    path = tmp_path / "router.yaml"
    document = config_document(cluster)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    args = parse_args(["--demo", "--port", "0", "--config", str(path)])
    environ = environment_with(args, {})
    config = load(path, environ)
    assert config.chaos.enabled and config.server.host == "127.0.0.1"
    live = LiveRuntime(Runtime(config, Router(config)))
    reloader = Reloader(live, HealthService(), str(path), environ)
    live.runtime.router.set_strategy("least_connections")
    live.runtime.router.set_strategy("random", "qdrant")

    reloaded, ignored = await reloader.reload()
    assert ignored == [] and reloaded.chaos.enabled and reloaded.server.host == "127.0.0.1"
    router = live.runtime.router
    assert router.strategy == "least_connections" and router.qdrant.strategy == "random"

    document["routing"] = {"strategy": "weighted"}  # the file changes it: the file wins
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    await reloader.reload()
    assert live.runtime.router.strategy == "weighted"
    assert live.runtime.router.qdrant.strategy == "weighted"


def test_command_line_values_are_validated_like_the_file(tmp_path, capsys) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("{}\n")
    assert main(["--port", "99999", "--check-config", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "server.port" in error and "99999" in error


def test_simulate_refuses_arguments_that_mean_nothing(capsys) -> None:
    for arguments in (["--rate", "0"], ["--requests", "-5"], ["--strategies", ""]):
        with pytest.raises(SystemExit) as exit_:
            main(["simulate", *arguments])
        assert exit_.value.code == 2
        assert arguments[0] in capsys.readouterr().err


async def test_an_operator_drains_a_backend_and_it_stays_drained_across_a_reload(
    cluster: Cluster, start_gateway: StartGateway, http, tmp_path
) -> None:
    """HAProxy's `set server state drain`: no new requests, those in flight finish; kept
    across a reload until set back to ready."""
    path = tmp_path / "router.yaml"
    document = config_document(cluster)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    gateway = await start_gateway(load(path, environ={}))
    primary = cluster["qdrant-primary"].behaviour
    secondary = cluster["qdrant-secondary"].behaviour
    url = f"{gateway.url}/api/v1/router/backends/qdrant-primary/state"
    search = f"{gateway.url}/api/v1/vectors/search"
    body = {"query_vector": [0.1, 0.2, 0.3], "collection": "documents"}

    primary.latency = 0.3
    slow = [asyncio.create_task(http.post(search, json=body)) for _ in range(2)]
    await asyncio.sleep(0.1)  # one of them is on the primary now
    async with http.put(url, json={"state": "drain"}) as response:
        assert response.status == 200
        change = await response.json()
    assert change["previous_state"] == "ready" and change["state"] == "drain"
    assert change["in_flight"] == 1
    for task in slow:
        response = await task
        assert response.status == 200  # the one in flight finished
        response.release()
    primary.latency = 0
    before = primary.requests
    for _ in range(6):
        async with http.post(search, json=body) as response:
            assert response.status == 200
            assert response.headers["x-router-backend"] == "qdrant-secondary"
    assert primary.requests == before

    async with http.post(f"{gateway.url}/api/v1/router/reload", headers=JSON) as response:
        assert response.status == 200
    async with http.get(f"{gateway.url}/api/v1/router/backends") as response:
        states = {b["name"]: b["admin_state"] for b in (await response.json())["qdrant"]}
    assert states == {"qdrant-primary": "drain", "qdrant-secondary": "ready"}
    async with http.post(search, json=body) as response:
        assert response.headers["x-router-backend"] == "qdrant-secondary"

    async with http.put(url, json={"state": "ready"}) as response:
        assert response.status == 200
    served = set()
    for _ in range(4):
        async with http.post(search, json=body) as response:
            served.add(response.headers["x-router-backend"])
    assert served == {"qdrant-primary", "qdrant-secondary"}
    assert secondary.requests > 0


async def test_draining_every_backend_of_a_model_refuses_it_clearly(gateway, http) -> None:
    base = f"{gateway.url}/api/v1/router/backends"
    async with http.put(f"{base}/hermes-2/state", json={"state": "maint"}) as response:
        assert response.status == 200
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 503
        assert "no backend of hermes-2" in (await r.json())["error"]["message"]
    for _ in range(8):  # `auto` routes around it
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as r:
            assert r.status == 200 and r.headers["x-router-backend"] != "hermes-2"
    async with http.put(f"{base}/nope/state", json={"state": "drain"}) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "backend_not_found"
    async with http.put(f"{base}/hermes-2/state", json={"state": "off"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "invalid_state" and "ready, drain, maint" in error["message"]
