"""Active health checks against real simulated backends: fall and rise thresholds."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from config.schema import Config, HealthCheckConfig, parse
from health import active
from health.active import ActiveHealthChecker, ProbeState
from health.stats import SAMPLES, LatencyRing, OutcomeRing, PeakEwma
from proxy.router import Router
from proxy.verdict import fails_backend
from simulator.cluster import Cluster
from tests.conftest import ManualClock, StartGateway, chat, config_document
from tests.process import free_port


async def test_backend_goes_down_after_fall_and_up_after_rise(cluster: Cluster) -> None:
    router = Router(parse_config(cluster))
    checker = ActiveHealthChecker(
        [router.models["hermes-2"]],
        HealthCheckConfig(interval=60, timeout=0.5, fall=3, rise=2),
        random.Random(0),
        probe_failed=fails_backend,
    )
    checker.start()  # the loops wait up to one interval first; the test probes by hand
    try:
        probe = checker.probes["hermes-2"]
        upstream = probe.upstream
        assert await checker.check(probe)
        assert upstream.last_check is not None and upstream.last_response_ms is not None
        cluster["hermes-2"].behaviour.status = 503
        for expected in (True, True, False):
            assert not await checker.check(probe)
            assert upstream.healthy is expected
        cluster["hermes-2"].behaviour.status = 200
        assert await checker.check(probe)
        assert not upstream.healthy
        assert await checker.check(probe)
        assert upstream.healthy
    finally:
        await checker.stop()


async def test_unhealthy_backend_gets_no_traffic(cluster: Cluster, start_gateway, http) -> None:
    gateway = await start_gateway(config_document(cluster))
    next(u for u in gateway.router.upstreams if u.name == "mixtral-8x7b").healthy = False
    gateway.router.refresh_health()  # what the checker does when a verdict changes
    seen = set()
    for _ in range(6):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
            seen.add(response.headers["x-router-backend"])
    assert seen == {"hermes-2", "openchat-3.5", "phi-3-mini"}
    assert cluster["mixtral-8x7b"].behaviour.requests == 0
    assert not gateway.router.auto.failing_open


async def test_whole_pool_unhealthy_fails_open(cluster: Cluster, start_gateway, http) -> None:
    gateway = await start_gateway(config_document(cluster))
    for upstream in gateway.router.qdrant.upstreams:
        upstream.healthy = False
    gateway.router.refresh_health()
    assert gateway.router.qdrant.failing_open
    body = {"query_vector": [0.5], "collection": "documents"}
    async with http.post(f"{gateway.url}/api/v1/vectors/search", json=body) as response:
        assert response.status == 200  # tried anyway rather than refusing everything
    # A model whose only backend is unhealthy fails open when named, but `auto` avoids it.
    mixtral = gateway.router.models["mixtral-8x7b"].upstreams[0]
    mixtral.healthy = False
    gateway.router.refresh_health()
    assert gateway.router.models["mixtral-8x7b"].failing_open
    async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("mixtral-8x7b")) as r:
        assert r.status == 200
    for _ in range(4):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat("auto")) as r:
            assert r.headers["x-router-backend"] != "mixtral-8x7b"


def parse_config(cluster: Cluster) -> Config:
    return parse(config_document(cluster), {})


def test_fall_and_rise_count_consecutive_results_only() -> None:
    backend = SimpleNamespace(name="b", healthy=True)
    probe = ProbeState(backend, "/health")  # type: ignore[arg-type]

    def results(*oks: bool) -> list[bool]:
        return [probe.record(ok, fall=3, rise=2) for ok in oks]

    assert results(False, False, True, False, False) == [False] * 5  # never 3 in a row
    assert backend.healthy
    assert results(False, False) == [True, False]  # down once, reported once
    assert not backend.healthy
    assert results(True, False, True) == [False] * 3  # never 2 good in a row
    assert results(True) == [True] and backend.healthy
    assert results(True, True) == [False, False]
    down = SimpleNamespace(name="c", healthy=False)  # e.g. kept down across a reload
    probe = ProbeState(down, "/health")  # type: ignore[arg-type]
    assert results(True) == [False] and results(True) == [True] and down.healthy


class SleepRecorder:
    """health.active's asyncio, with `sleep` recorded and made instant: the test reads the
    checker's schedule instead of waiting for it."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._real_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self._real_sleep(0.001)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


async def test_the_checker_probes_on_its_own_schedule_and_reports_each_change(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = Router(parse_config(cluster))
    upstream = router.models["hermes-2"].upstreams[0]
    clock = SleepRecorder()
    monkeypatch.setattr(active, "asyncio", clock)
    changes: list[bool] = []
    checker = ActiveHealthChecker(
        [router.models["hermes-2"]],
        HealthCheckConfig(interval=10, timeout=0.5, fall=2, rise=1),
        random.Random(3),
        on_change=lambda: changes.append(upstream.healthy),
        probe_failed=fails_backend,
    )
    behaviour = cluster["hermes-2"].behaviour
    behaviour.status = 503

    async def until(expected: list[bool]) -> None:
        for _ in range(500):
            if changes == expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"health changes {changes}, expected {expected}")

    checker.start()
    tasks = list(checker._tasks)
    try:
        await until([False])
        behaviour.status = 200
        await until([False, True])
    finally:
        await checker.stop()
    assert all(task.done() for task in tasks)  # stop() returns once the loops have ended
    assert behaviour.requests >= 3 and len(clock.sleeps) >= 3  # a pause after every probe
    schedule = random.Random(3)
    # a random start within the first round (at most a second: "starting" is short)
    expected = [schedule.uniform(0, 1.0)]
    expected += [10 * schedule.uniform(0.9, 1.1) for _ in clock.sleeps[1:]]
    assert clock.sleeps == pytest.approx(expected)
    assert upstream.last_response_ms is not None and 0 < upstream.last_response_ms < 5000
    assert upstream.last_response_ms == round(upstream.last_response_ms, 3)
    assert upstream.last_check is not None and abs(upstream.last_check - time.time()) < 5


async def test_a_probe_that_times_out_or_finds_nobody_fails(cluster: Cluster) -> None:
    router = Router(parse_config(cluster))
    checker = ActiveHealthChecker(
        [router.models["hermes-2"], router.models["phi-3-mini"]],
        HealthCheckConfig(interval=60, timeout=0.05, fall=1, rise=1),
        random.Random(0),
        probe_failed=fails_backend,
    )
    cluster["hermes-2"].behaviour.latency = 0.5
    checker.probes["phi-3-mini"].upstream.url = f"http://127.0.0.1:{free_port()}"  # nobody there
    checker.start()
    try:
        for name in ("hermes-2", "phi-3-mini"):
            probe = checker.probes[name]
            assert not await checker.check(probe)
            assert not probe.upstream.healthy
    finally:
        await checker.stop()


def test_peak_ewma_takes_a_slower_sample_at_once_and_decays_toward_faster_ones() -> None:
    clock = ManualClock()
    ewma = PeakEwma(tau=10.0, clock=clock)
    assert ewma.value is None and ewma.estimate(3.0) == 3.0  # no opinion: the target
    ewma.observe(1.0)
    ewma.observe(2.0)
    assert ewma.value == 2.0
    clock.advance(10.0)
    ewma.observe(0.5)
    assert ewma.value == pytest.approx(2.0 * math.exp(-1) + 0.5 * (1 - math.exp(-1)))
    value = ewma.value
    assert ewma.estimate(0.0) == pytest.approx(value)  # no time has passed
    clock.advance(20.0)
    assert ewma.estimate(0.1) == pytest.approx(value * math.exp(-2) + 0.1 * (1 - math.exp(-2)))
    ewma.reset()
    assert ewma.value is None


def test_latency_ring_mean_percentiles_and_wraparound() -> None:
    ring = LatencyRing()
    assert ring.mean() == 0.0 and ring.percentile(0.5) == 0.0
    for value in range(1, 11):
        ring.add(float(value))
    assert ring.mean() == 5.5 and ring.count == 10
    assert [ring.percentile(f) for f in (0.0, 0.5, 0.95, 1.0)] == [1.0, 6.0, 10.0, 10.0]
    assert ring.recent_p95(0.0) == 10.0
    ring.add(100.0)
    assert ring.recent_p95(0.5) == 10.0  # recomputed at most once a second
    assert ring.recent_p95(1.0) == 100.0
    for value in range(SAMPLES):
        ring.add(1.0 + value % 2)
    assert ring.count == SAMPLES and ring.mean() == 1.5  # only the last SAMPLES values
    forty = LatencyRing()
    for value in range(1, 41):
        forty.add(float(value))
    assert forty.recent_p95(0.0) == 39.0  # the 95th percentile, not the slowest


def test_outcome_ring_keeps_the_last_samples() -> None:
    ring = OutcomeRing()
    assert ring.success_rate() == 1.0
    ring.add(True)
    ring.add(False)
    assert ring.success_rate() == 0.5
    for _ in range(SAMPLES):
        ring.add(False)
    assert ring.success_rate() == 0.0 and ring.count == SAMPLES
    for index in range(SAMPLES):
        ring.add(index % 4 != 0)
    assert ring.success_rate() == 0.75 and ring.successes == 3 * SAMPLES // 4


async def test_health_says_starting_until_every_backend_was_probed_once(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    """Issue 12: a gateway with nothing behind it said "healthy" for the first ~90 s. Until the
    first round of checks (spread over at most a second) it says "starting", with 503."""
    gateway = await start_gateway(
        config_document(cluster, health_check={"enabled": True, "interval": 30})
    )
    async with http.get(f"{gateway.url}/health") as response:
        assert response.status == 503 and (await response.json())["status"] == "starting"
    async with http.get(f"{gateway.url}/health/ready") as response:
        assert response.status == 503 and (await response.json())["status"] == "starting"
    for _ in range(40):
        async with http.get(f"{gateway.url}/health") as response:
            if response.status == 200:
                assert (await response.json())["status"] == "healthy"
                break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("still starting after 4 s")
    async with http.get(f"{gateway.url}/health/ready") as response:
        assert response.status == 200
