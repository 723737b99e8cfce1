"""Health and metrics endpoints in their specified shapes, moved by real traffic."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from health.stats import SAMPLES, LatencyRing
from simulator.cluster import Cluster
from telemetry.history import added_since, last_values
from tests.conftest import ManualClock, StartGateway, chat, config_document
from tests.process import gateway_process
from tests.test_metrics_merge import send, worker_pids


async def get_json(http, url: str) -> dict:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_every_response_carries_the_router_headers(gateway, http) -> None:
    cases = [
        chat("hermes-2"),  # proxied
        chat("no-such-model"),  # refused before routing
        {"model": 3},  # bad input
    ]
    for body in cases:
        async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
            for header in (
                "x-request-id",
                "x-router-backend",
                "x-router-attempts",
                "x-router-overhead-ms",
            ):
                assert header in response.headers, (body, header)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.headers["x-router-backend"] == "hermes-2"
        assert r.headers["x-router-attempts"] == "1"
        assert 0 < float(r.headers["x-router-overhead-ms"]) < 50


async def test_routing_metrics_follow_traffic(gateway, http, cluster: Cluster) -> None:
    url = f"{gateway.url}/api/v1/router/metrics"
    before = await get_json(http, url)
    assert before["load_balancing"]["backend_distribution"]["hermes-2"]["requests"] == 0
    for _ in range(3):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini")) as r:
        assert r.status == 200
    after = await get_json(http, url)
    routing = after["routing_metrics"]
    assert routing["total_requests"] == 4 and routing["successful_requests"] == 4
    assert routing["failed_requests"] == 0 and routing["success_rate"] == 1.0
    assert routing["avg_response_time_ms"] > 0
    distribution = after["load_balancing"]["backend_distribution"]
    assert distribution["hermes-2"] == {"requests": 3, "percentage": 75.0}
    assert distribution["phi-3-mini"]["percentage"] == 25.0
    assert after["load_balancing"]["strategy"] == "round_robin"
    assert after["load_balancing"]["distribution_variance"] > 0
    assert after["circuit_breakers"]["hermes-2"] == {
        "status": "closed",
        "failure_count": 0,
        "last_failure": None,
        "slow_requests": 0,
        "trips": 0,
    }
    assert set(after["failover_events"]) == {
        "total_failovers",
        "successful_failovers",
        "avg_failover_time_ms",
        "last_failover",
    }


async def test_failing_backend_shows_in_breakers_health_and_model_status(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, retry={"max_retries": 0}))
    cluster["phi-3-mini"].behaviour.status = 500
    for _ in range(5):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini")) as r:
            assert r.status == 500
    metrics = await get_json(http, f"{gateway.url}/api/v1/router/metrics")
    breaker = metrics["circuit_breakers"]["phi-3-mini"]
    assert breaker["status"] == "open" and breaker["failure_count"] == 5
    assert breaker["last_failure"].endswith("Z")
    health = await get_json(http, f"{gateway.url}/api/v1/router/health")
    assert health["health_status"]["phi-3-mini"]["phi-3-mini"]["status"] == "circuit_open"
    assert health["overall_health"] == "degraded"
    assert (health["total_backends"], health["healthy_backends"]) == (8, 7)
    assert health["unhealthy_backends"] == 1
    models = (await get_json(http, f"{gateway.url}/models/status"))["models"]
    assert models["phi-3-mini"]["circuit_open"] is True
    assert models["phi-3-mini"]["health_score"] == 0
    assert models["phi-3-mini"]["adaptive_breakers"]["phi-3-mini"]["failures"] == 5
    assert models["hermes-2"]["health_score"] == 100
    stats = await get_json(http, f"{gateway.url}/v1/admin/models/stats")
    assert stats["models"].keys() == models.keys() and stats["should_shed_load"] is False


async def test_failover_events_are_counted(gateway, http, cluster: Cluster) -> None:
    cluster["mixtral-8x7b"].behaviour.status = 503
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
        assert response.status == 200 and response.headers["x-router-attempts"] == "2"
    events = (await get_json(http, f"{gateway.url}/api/v1/router/metrics"))["failover_events"]
    assert events["total_failovers"] == 1 and events["successful_failovers"] == 1
    assert events["avg_failover_time_ms"] > 0 and events["last_failover"].endswith("Z")


async def test_model_status_counts_tokens_from_usage(gateway, http) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
    body = chat("hermes-2", stream=True) | {"stream_options": {"include_usage": True}}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
        await r.read()
    hermes = (await get_json(http, f"{gateway.url}/models/status"))["models"]["hermes-2"]
    assert hermes["total_requests"] == 2
    assert hermes["tokens"] == {"prompt": 2, "completion": 16}
    assert hermes["cost"] == round(2 * 0.0018, 6)
    assert hermes["avg_ttft"] > 0 and hermes["p99_latency"] >= hermes["p95_latency"] > 0


async def test_prometheus_exposition_parses_and_counts(gateway, http, cluster: Cluster) -> None:
    cluster["openchat-3.5"].behaviour.token_delay = 0.01
    for model in ("hermes-2", "hermes-2"):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat(model)) as r:
            assert r.status == 200
    body = chat("openchat-3.5", stream=True) | {"stream_options": {"include_usage": True}}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
        await r.read()
    async with http.get(f"{gateway.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (
        ("backend", "hermes-2"),
        ("code", "200"),
        ("pool", "hermes-2"),
        ("route", "/v1/chat/completions"),
        ("status_class", "2xx"),
    )
    assert samples[("router_requests_total", key)] == 2
    openchat = (("backend", "openchat-3.5"), ("pool", "openchat-3.5"))
    assert samples[("router_time_to_first_token_seconds_count", openchat)] == 1
    assert samples[("router_inter_token_gap_seconds_count", (("pool", "openchat-3.5"),))] >= 7
    assert samples[("router_tokens_total", (("kind", "completion"), ("model", "hermes-2")))] == 16
    assert samples[("router_gateway_overhead_seconds_count", ())] == 3
    assert samples[("router_breaker_state", (("backend", "hermes-2"),))] == 0
    assert samples[("router_backend_healthy", (("backend", "phi-3-mini"),))] == 1
    assert samples[("router_in_flight", ())] == 0
    assert ("router_retries_total", ()) in samples


async def test_metrics_can_be_turned_off(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(
        config_document(cluster), environ={"ROUTER_METRICS_ENABLED": "false"}
    )
    async with http.get(f"{gateway.url}/metrics") as response:
        assert response.status == 404


async def test_health_endpoints(gateway, http, cluster: Cluster) -> None:
    health = await get_json(http, f"{gateway.url}/health")
    assert health["status"] == "healthy" and health["load_balancing"] is True
    assert health["circuit_breaker"] is True and health["timestamp"].endswith("Z")
    assert (await get_json(http, f"{gateway.url}/health/live"))["status"] == "alive"
    assert (await get_json(http, f"{gateway.url}/health/ready"))["status"] == "ready"
    for pool in gateway.router.models.values():
        for upstream in pool.upstreams:
            upstream.breaker.force_open()
    async with http.get(f"{gateway.url}/health") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "unhealthy"


async def test_pauses_between_retries_are_not_gateway_overhead(
    start_gateway: StartGateway, cluster: Cluster, http
) -> None:
    """x-router-overhead-ms is the gateway's own time; a retry's backoff is shown apart."""
    gateway = await start_gateway(config_document(cluster, retry={"delay": 0.3, "max_delay": 0.3}))
    cluster["hermes-2"].behaviour.fail_next = 1  # hermes-2 has one backend: the retry waits
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
        assert r.headers["x-router-attempts"] == "2"
        backoff = float(r.headers["x-router-backoff-ms"])
        overhead = float(r.headers["x-router-overhead-ms"])
    assert backoff >= 200  # jittered around the 0.3 s delay
    assert overhead < 100  # without the pause; with it, it would be >= 200
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert "x-router-backoff-ms" not in r.headers  # no retry, no pause


async def test_requests_per_second_counts_the_current_second(
    start_gateway: StartGateway, cluster: Cluster, http
) -> None:
    """40 requests sent within one second and read at once are 40/s, not 0.0 (the current
    second counts for the part of it that has passed); ten seconds later they have aged out
    of the window as whole seconds do."""
    clock = ManualClock(1000.2)
    gateway = await start_gateway(config_document(cluster), clock=clock)
    for _ in range(40):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
    clock.advance(0.5)
    url = f"{gateway.url}/api/v1/router/metrics"
    assert (await get_json(http, url))["routing_metrics"]["requests_per_second"] == 40.0
    clock.advance(3.0)  # 3.5 s up: the 40 spread over the uptime
    rate = (await get_json(http, url))["routing_metrics"]["requests_per_second"]
    assert rate == round(40 / 3.5, 3)
    clock.advance(10.0)
    assert (await get_json(http, url))["routing_metrics"]["requests_per_second"] == 0.0


async def scrape(http, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_responses_are_counted_by_status_code(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Status codes, not only classes: a backend's 429 and 503 and the gateway's own 200s are
    told apart in /metrics (a `code` label, only for codes sent) and in the JSON metrics."""
    gateway = await start_gateway(config_document(cluster, retry={"max_retries": 0}))
    for _ in range(3):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
            assert r.status == 200
    cluster["phi-3-mini"].behaviour.status = 503
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("phi-3-mini")) as r:
        assert r.status == 503
    cluster["openchat-3.5"].behaviour.status = 429
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("openchat-3.5")) as r:
        assert r.status == 429
    samples = await scrape(http, gateway.url)
    codes: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "router_requests_total":
            label = dict(labels)
            assert label["status_class"] == label["code"][0] + "xx"
            codes[label["code"]] = codes.get(label["code"], 0) + value
    assert codes == {"200": 3, "503": 1, "429": 1}  # no series for codes never sent
    metrics = await get_json(http, f"{gateway.url}/api/v1/router/metrics")
    assert metrics["routing_metrics"]["by_status"] == {"200": 3, "429": 1, "503": 1}


async def test_latency_histograms_per_backend_process_metrics_and_units(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Duration and TTFT histograms carry the backend; process_* come from the app's own
    registry; every router_* counter ends in _total and the cost says its unit."""
    gateway = await start_gateway(config_document(cluster))
    cluster["openchat-3.5"].behaviour.token_delay = 0.005
    body = chat("openchat-3.5", stream=True)
    for _ in range(2):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as r:
            await r.read()
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("hermes-2")) as r:
        assert r.status == 200
    samples = await scrape(http, gateway.url)
    openchat = (("backend", "openchat-3.5"), ("pool", "openchat-3.5"))
    assert samples[("router_request_duration_seconds_count", openchat)] == 2
    assert samples[("router_time_to_first_token_seconds_count", openchat)] == 2
    hermes = (("backend", "hermes-2"), ("pool", "hermes-2"))
    assert samples[("router_request_duration_seconds_count", hermes)] == 1
    assert samples[("router_cost_dollars_total", (("model", "hermes-2"),))] > 0
    assert not any(name.startswith("router_cost_total") for name, _ in samples)
    assert samples[("process_resident_memory_bytes", ())] > 10_000_000
    assert samples[("process_open_fds", ())] > 0
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert 0 < samples[("process_start_time_seconds", ())] <= time.time()
    assert any(name == "python_info" for name, _ in samples)
    async with http.get(f"{gateway.url}/metrics") as response:
        families = list(text_string_to_metric_families(await response.text()))
    for family in families:
        if family.name.startswith("router_") and family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if "cost" in family.name:
            assert family.name == "router_cost_dollars", family.name


async def test_history_keeps_the_last_minutes_on_the_server(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """The dashboard's history is sampled by the gateway every two seconds whether or not a
    page is open: points on wall-clock multiples of the period, counts as rates, statuses by
    code, events, per-pool shares."""
    gateway = await start_gateway(config_document(cluster, retry={"max_retries": 0}))
    cluster["phi-3-mini"].behaviour.status = 503
    for index in range(8):
        model = "phi-3-mini" if index == 0 else "hermes-2"
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat(model)) as r:
            await r.read()
    url = f"{gateway.url}/api/v1/router/history"
    for _ in range(60):
        history = await get_json(http, url)
        if sum(history["requests_per_second"]) > 0:
            break
        await asyncio.sleep(0.2)
    period = history["period_s"]
    assert period == 2.0
    times = history["t"]
    assert times and all(t % 2 == 0 for t in times) and times == sorted(times)
    assert abs(times[-1] - time.time()) < 5
    columns = [history[name] for name in ("requests_per_second", "queued", "p50_ms", "p99_ms")]
    assert all(len(column) == len(times) for column in columns)
    assert sum(history["requests_per_second"]) * period == 8
    statuses = history["status_per_second"]
    assert sum(statuses["503"]) * period == 1 and sum(statuses["200"]) * period == 7
    assert sum(history["errors_per_second"]) * period == 1
    assert set(history["events_per_second"]) >= {"retries", "fallbacks", "shed", "rate_limited"}
    shares = history["shares"]
    assert set(shares) == {"models", "qdrant", "embedding"}
    busy = [i for i, value in enumerate(history["requests_per_second"]) if value]
    assert all(
        sum(shares["models"][backend][i] or 0 for backend in shares["models"]) == 100 for i in busy
    )
    assert all(value is None for value in shares["qdrant"]["qdrant-primary"])


async def test_history_and_process_metrics_merge_across_two_workers(
    cluster: Cluster, tmp_path: Path
) -> None:
    """With --workers 2: the history's points fall on the same instants in both workers and
    add up; process_* are the gateway's (memory and descriptors summed over the workers, the
    oldest start time), never per worker."""
    async with gateway_process(
        config_document(cluster), tmp_path, {"ROUTER_WORKER_THREADS": "2"}
    ) as gateway:
        pids = await worker_pids(gateway.url, 2)
        assert await send(gateway.url, 20, chat("hermes-2")) == 20
        for _ in range(60):
            history = orjson.loads(await fetch(gateway.url, "/api/v1/router/history"))
            if sum(history["requests_per_second"]) * history["period_s"] == 20:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the merged history does not hold 20 requests: {history}")
        assert sum(history["status_per_second"]["200"]) * history["period_s"] == 20
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await fetch(gateway.url, "/metrics"))
            for s in family.samples
        }
        assert not [key for key in samples if key[0].startswith("process_") and key[1]]
        rss = [int((Path(f"/proc/{pid}/statm").read_text().split())[1]) for pid in pids]
        summed = sum(rss) * os.sysconf("SC_PAGE_SIZE")
        assert 0.8 * summed < samples[("process_resident_memory_bytes", ())] < 1.25 * summed
        fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
        assert abs(samples[("process_open_fds", ())] - fds) <= 10
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0


async def fetch(url: str, path: str) -> str:
    """On a new connection each time: the kernel may hand it to either worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{url}{path}") as response:
            assert response.status == 200
            return await response.text()


def test_history_reads_the_values_a_ring_took_since_the_last_point() -> None:
    """The interval's percentiles come from the samples added since the previous point, read
    across the ring's wrap; a ring that went exactly round reads as unchanged (TTFT: no
    stream seen rather than a stale mean)."""
    ring = LatencyRing()
    for value in range(SAMPLES - 2):
        ring.add(float(value))
    at = (ring.next, ring.count)
    for value in (1000.0, 1001.0, 1002.0, 1003.0, 1004.0):
        ring.add(value)
    assert added_since(ring, at) == 5
    assert last_values(ring, 5) == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    assert last_values(ring, 0) == [] and len(last_values(ring, 10 * SAMPLES)) == SAMPLES
    at = (ring.next, ring.count)
    for _ in range(SAMPLES):
        ring.add(7.0)
    assert added_since(ring, at) == 0
