"""/metrics with several workers (issue 13): counters that never go backwards, gauges merged by
their declared rule (never a summed or averaged percentile), label values escaped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from cluster.metrics_merge import CounterLedger, Exposition, merge_prometheus, render
from simulator.cluster import Cluster
from telemetry.prometheus import GAUGE_MERGE
from tests.conftest import StartGateway, chat, config_document
from tests.process import ROOT, gateway_process

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
ODD = 'a "quoted" \\ back\\slash\nnewline'


class Families(Collector):
    def __init__(self, *families: Metric) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(*families: Metric) -> str:
    """What a worker's /metrics says, written by prometheus_client as the gateway's is."""
    registry = CollectorRegistry()
    registry.register(Families(*families))
    return generate_latest(registry).decode()


def worker(
    requests: float,
    *,
    in_flight: float = 0,
    breaker: float = 0,
    healthy: float = 1,
    backend: str = "b1",
) -> str:
    counter = CounterMetricFamily("router_requests", "Finished requests", labels=["backend"])
    counter.add_metric([backend], requests)
    histogram = HistogramMetricFamily(
        "router_request_duration_seconds", "Duration", labels=["pool"]
    )
    histogram.add_metric(["p"], [("0.1", requests), ("+Inf", requests)], requests * 0.05)
    flights = GaugeMetricFamily("router_in_flight", "Requests in flight", value=in_flight)
    breakers = GaugeMetricFamily("router_breaker_state", "Breaker", labels=["backend"])
    breakers.add_metric([backend], breaker)
    health = GaugeMetricFamily("router_backend_healthy", "Health", labels=["backend"])
    health.add_metric([backend], healthy)
    return exposition(counter, histogram, flights, breakers, health)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def merged(
    answers: list[Exposition], ledger: CounterLedger | None, workers: int = 2
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = render(merge_prometheus(answers, workers, ledger), "")
    return samples(body.decode())


def requests_total(values: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in values.items() if name == "router_requests_total")


def test_label_values_are_escaped_and_parse_back_in_both_formats() -> None:
    answers = [Exposition(0, 10, worker(2, backend=ODD)), Exposition(1, 11, worker(3, backend=ODD))]
    families = merge_prometheus(answers, 2, None)
    text, text_type = render(families, "")
    assert text_type.startswith("text/plain")
    assert samples(text.decode())[("router_requests_total", (("backend", ODD),))] == 5
    body, body_type = render(families, OPENMETRICS)
    assert body_type.startswith("application/openmetrics-text")
    parsed = {
        (sample.name, tuple(sample.labels.items())): sample.value
        for family in openmetrics_families(body.decode())  # the strict parser
        for sample in family.samples
    }
    assert parsed[("router_requests_total", (("backend", ODD),))] == 5
    assert parsed[("router_breaker_state", (("backend", ODD),))] == 0


def test_counters_survive_a_late_worker_and_a_restart(tmp_path: Path) -> None:
    ledger = CounterLedger(tmp_path)
    both = merged(
        [Exposition(0, 100, worker(5)), Exposition(1, 200, worker(7, in_flight=3))], ledger
    )
    assert requests_total(both) == 12
    assert both[("router_in_flight", ())] == 3

    # Worker 1 misses the deadline: its counters stay at their last-seen values, its gauges go.
    late = merged([Exposition(0, 100, worker(6, in_flight=1))], ledger)
    assert requests_total(late) == 13
    assert late[("router_request_duration_seconds_count", (("pool", "p"),))] == 13
    assert late[("router_in_flight", ())] == 1
    assert late[("router_worker_up", (("worker", "1"),))] == 0

    # Worker 1 comes back as a new process counting from zero: its old total is its base.
    restarted = merged([Exposition(0, 100, worker(6)), Exposition(1, 201, worker(1))], ledger)
    assert requests_total(restarted) == 6 + 7 + 1
    assert restarted[("router_worker_restarts_total", (("worker", "1"),))] == 1
    assert restarted[("router_worker_up", (("worker", "1"),))] == 1
    assert restarted[("router_request_duration_seconds_sum", (("pool", "p"),))] == pytest.approx(
        (6 + 7 + 1) * 0.05
    )

    # A late answer from the process that was replaced is not taken (it would count twice)...
    stale = merged([Exposition(0, 100, worker(6)), Exposition(1, 200, worker(9))], ledger)
    assert requests_total(stale) == 14
    assert stale[("router_worker_up", (("worker", "1"),))] == 0
    # ...nor is an older answer of the same process (two workers merging at once).
    older = merged([Exposition(0, 100, worker(4)), Exposition(1, 201, worker(3))], ledger)
    assert requests_total(older) == 6 + 7 + 3

    # Any worker answering a scrape reads the same ledger: a second one sees the same totals.
    other = merged(
        [Exposition(1, 201, worker(3)), Exposition(0, 100, worker(6))], CounterLedger(tmp_path)
    )
    assert requests_total(other) == 16


def test_gauges_merge_by_their_rule_and_percentiles_are_never_summed() -> None:
    def answer(index: int, p99: float, breaker: float, healthy: float) -> Exposition:
        quantile = GaugeMetricFamily("router_p99_seconds", "An undeclared percentile gauge")
        quantile.add_metric([], p99)
        summary = SummaryMetricFamily(
            "router_wait_seconds", "A summary", count_value=4, sum_value=2
        )
        summary.add_sample("router_wait_seconds", {"quantile": "0.99"}, p99)
        text = worker(1, in_flight=2, breaker=breaker, healthy=healthy) + exposition(
            quantile, summary
        )
        return Exposition(index, 100 + index, text)

    values = merged(
        [answer(0, 0.5, breaker=2, healthy=1), answer(1, 1.5, breaker=0, healthy=0)], None
    )
    assert values[("router_in_flight", ())] == 4  # in progress: adds up
    assert values[("router_breaker_state", (("backend", "b1"),))] == 2  # the worst
    assert values[("router_backend_healthy", (("backend", "b1"),))] == 0  # the least healthy
    # Percentiles stay per worker: neither 2.0 (summed) nor 1.0 (averaged) appears.
    assert values[("router_p99_seconds", (("worker", "0"),))] == 0.5
    assert values[("router_p99_seconds", (("worker", "1"),))] == 1.5
    assert ("router_p99_seconds", ()) not in values
    assert values[("router_wait_seconds", (("quantile", "0.99"), ("worker", "1")))] == 1.5
    assert values[("router_wait_seconds_count", ())] == 8  # a summary's count does add up


async def test_every_gauge_the_gateway_exposes_declares_how_it_merges(
    cluster: Cluster, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(config_document(cluster))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
            assert response.status == 200
        async with http.get(f"{gateway.url}/metrics") as response:
            text = await response.text()
    gauges = {f.name for f in text_string_to_metric_families(text) if f.type == "gauge"}
    kinds = {f.type for f in text_string_to_metric_families(text)}
    assert gauges and gauges <= set(GAUGE_MERGE), gauges - set(GAUGE_MERGE)
    assert kinds <= {"counter", "gauge", "histogram"}  # summaries would need a decision too


def _count_up(directory: str, index: str, rounds: str) -> None:
    """One worker's merges, each with its counter one higher; exits 1 if a merged total falls."""
    ledger = CounterLedger(Path(directory))
    seen = 0.0
    for value in range(1, int(rounds) + 1):
        body, _ = render(
            merge_prometheus([Exposition(int(index), 1000, worker(value))], 4, ledger), ""
        )
        total = requests_total(samples(body.decode()))
        if total < seen:
            sys.exit(f"worker {index}: merged total fell from {seen} to {total}")
        seen = total


async def test_the_ledger_is_updated_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Four processes merge at once, each for its own worker: without the lock, one's write
    would drop another's worker from the ledger, and the merged total would fall."""
    code = "import sys; from tests.test_metrics_merge import _count_up; _count_up(*sys.argv[1:])"
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, str(tmp_path), str(index), "100", cwd=ROOT
        )
        for index in range(4)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), 30)
    assert codes == [0, 0, 0, 0]
    assert requests_total(merged([], CounterLedger(tmp_path), 4)) == 4 * 100


# Real processes: a gateway with two workers.


async def scrape(url: str, accept: str = "") -> str:
    """On a new connection each time: the kernel may hand it to either worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{url}/metrics", headers={"Accept": accept}) as response:
            assert response.status == 200
            return await response.text()


async def worker_pids(url: str, count: int, exclude: frozenset[int] = frozenset()) -> set[int]:
    pids: set[int] = set()
    for _ in range(300):
        try:
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(f"{url}/health/live") as response:
                    pid = (await response.json())["pid"]
            if pid not in exclude:
                pids.add(pid)
        except aiohttp.ClientError:
            pass  # a connection the dying worker had accepted
        if len(pids) == count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"found workers {pids}, wanted {count}")


async def send(url: str, count: int, body: dict) -> int:
    """`count` requests on new connections (spread over the workers); how many were answered."""
    answered = 0
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(count):
            try:
                async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                    await response.read()
                    answered += 1
            except aiohttp.ClientError:
                pass
    return answered


async def test_labels_with_quotes_and_backslashes_through_two_workers(
    cluster: Cluster, tmp_path: Path
) -> None:
    model, backend = 'q"uote\\model', 'b"ack\\slash'
    document = config_document(cluster)
    document["models"] = {model: {"endpoints": [{"name": backend, "url": cluster["hermes-2"].url}]}}
    async with gateway_process(document, tmp_path, {"ROUTER_WORKER_THREADS": "2"}) as gateway:
        await worker_pids(gateway.url, 2)
        assert await send(gateway.url, 10, chat(model)) == 10
        for accept, parse in (
            ("", text_string_to_metric_families),
            (OPENMETRICS, openmetrics_families),
        ):
            text = await scrape(gateway.url, accept)
            found = {
                (s.labels["pool"], s.labels["backend"]): s.value
                for family in parse(text)
                for s in family.samples
                if s.name == "router_requests_total"
            }
            assert found == {(model, backend): 10}
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0


def totals(text: str) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Requests, histogram count, and per worker: up, restarts."""
    values = samples(text)
    requests = requests_total(values)
    count = sum(v for (n, _), v in values.items() if n == "router_request_duration_seconds_count")

    def per_worker(name: str) -> dict[str, float]:
        return {dict(labels)["worker"]: v for (n, labels), v in values.items() if n == name}

    return (
        requests,
        count,
        per_worker("router_worker_up"),
        per_worker("router_worker_restarts_total"),
    )


async def test_merged_counters_never_decrease_when_a_worker_is_killed(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with gateway_process(
        config_document(cluster), tmp_path, {"ROUTER_WORKER_THREADS": "2"}
    ) as gateway:
        pids = await worker_pids(gateway.url, 2)
        assert await send(gateway.url, 20, chat()) == 20
        seen = [totals(await scrape(gateway.url))]
        assert seen[0][0] == 20 and set(seen[0][2].values()) == {1.0}  # both have answered

        stop = asyncio.Event()

        async def traffic() -> int:
            answered = 0
            while not stop.is_set():
                answered += await send(gateway.url, 1, chat())
            return answered

        async def scrapes() -> None:
            while not stop.is_set():
                try:
                    seen.append(totals(await scrape(gateway.url)))
                except aiohttp.ClientError:
                    pass  # the connection went to the worker being killed
                await asyncio.sleep(0.03)

        background = asyncio.gather(traffic(), scrapes())
        await asyncio.sleep(0.3)
        victim = min(pids)
        assert _parent(victim) == gateway.process.pid  # a worker of this gateway's supervisor
        os.kill(victim, signal.SIGKILL)
        new = await worker_pids(gateway.url, 2, exclude=frozenset({victim})) - pids  # restarted
        assert len(new) == 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until a scrape has the new worker's answer
            if set(seen[-1][2].values()) == {1.0} and sum(seen[-1][3].values()) == 1:
                break
            await asyncio.sleep(0.05)
        stop.set()
        answered_meanwhile, _ = await background
        assert await send(gateway.url, 20, chat()) == 20
        seen.append(totals(await scrape(gateway.url)))

        requests = [s[0] for s in seen]
        counts = [s[1] for s in seen]
        assert requests == sorted(requests), requests
        assert counts == sorted(counts), counts
        assert any(0.0 in s[2].values() for s in seen)  # a scrape during the restart
        assert sorted(seen[-1][3].values()) == [0.0, 1.0]  # one worker was replaced, once
        # Nothing counted twice; what the killed worker served after its last scrape is lost.
        assert 40 <= requests[-1] <= 40 + answered_meanwhile
        gateway.signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.process.wait(), 15) == 0


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])
