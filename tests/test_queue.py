"""The admission queue as clients see it: waiting, priority, full, timeout, disconnects."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from admission.queue import PRIORITIES, Admission
from circuit.breaker import BreakerState, CircuitBreaker
from proxy.errors import QueueFull, QueueTimeout
from proxy.upstream import Pool, Upstream
from proxy.verdict import OK
from simulator.cluster import Cluster
from tests.conftest import ManualClock, RunningGateway, StartGateway, chat, config_document

# --- the queue itself, on a pool of plain Upstreams: exact counts, no backend, no sleeping ---


def pool(name: str = "a", max_concurrent: int = 1, breaker: CircuitBreaker | None = None) -> Pool:
    upstream = Upstream(
        name, "http://127.0.0.1:9", name, model=name, max_concurrent=max_concurrent, breaker=breaker
    )
    return Pool(name, [upstream], "round_robin")


async def queued(admission: Admission, pools: tuple[Pool, ...], priority: int = 1) -> asyncio.Task:
    task = asyncio.create_task(admission.wait(pools, (), priority))
    await asyncio.sleep(0)  # the request is in the queue now
    return task


async def test_every_served_request_gives_its_place_in_the_queue_back() -> None:
    """Many more requests than `queue.size` pass through the queue one after another: each
    leaves it when served, so none of them finds it full."""
    admission = Admission(max_in_flight=10, queue_size=2, queue_timeout=5)
    backends = pool()
    held = admission.try_acquire(backends)
    assert held is not None
    for _ in range(5):
        waiting = await queued(admission, (backends,))
        assert admission.queued == 1
        admission.release(held)
        held = await waiting
        assert admission.queued == 0 and admission.in_flight == 1
    assert repr(admission) == "<Admission 1 in flight of 10, 0 queued of 2>"
    admission.release(held)
    assert admission.in_flight == 0 and held.active == 0 and held.requests == 6


async def test_the_global_cap_is_exact_and_a_freed_slot_serves_one_waiting_request() -> None:
    admission = Admission(max_in_flight=2, queue_size=10, queue_timeout=5)
    backends = pool(max_concurrent=10)
    first, second = admission.try_acquire(backends), admission.try_acquire(backends)
    assert first is not None and second is not None
    assert admission.try_acquire(backends) is None  # a third would exceed the cap of 2
    waiting = [await queued(admission, (backends,)) for _ in range(2)]
    admission.release(first)
    await asyncio.sleep(0)
    assert [task.done() for task in waiting] == [True, False]
    assert admission.in_flight == 2 and admission.queued == 1 and first.active == 2
    admission.release(second)
    await asyncio.gather(*waiting)
    assert admission.in_flight == 2 and admission.queued == 0


async def test_the_queue_serves_by_priority_then_arrival() -> None:
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5)
    backends = pool()
    held = admission.try_acquire(backends)
    assert held is not None
    order = ["low", "normal-1", "high", "normal-2"]
    tasks = {
        tag: await queued(admission, (backends,), PRIORITIES[tag.split("-")[0]]) for tag in order
    }
    served: list[str] = []
    for _ in order:
        admission.release(held)
        await asyncio.sleep(0)
        tag = next(t for t, task in tasks.items() if task.done() and t not in served)
        served.append(tag)
        held = tasks[tag].result()
    assert served == ["high", "normal-1", "normal-2", "low"]


async def test_a_new_request_never_jumps_ahead_of_one_already_queued() -> None:
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5)
    busy, free = pool("busy"), pool("free")
    held = admission.try_acquire(busy)
    assert held is not None
    waiting = await queued(admission, (busy,))
    assert admission.try_acquire(free) is None  # `free` has room, but someone is waiting
    behind = await queued(admission, (free,))
    assert behind.done()  # ...so it queues, and is served at once
    admission.release(held)
    assert (await waiting).name == "busy"
    assert (await behind).name == "free" and admission.in_flight == 2


async def test_a_waiting_request_takes_the_first_of_its_pools_with_room() -> None:
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5)
    full, first, second = pool("full"), pool("first"), pool("second")
    held = [admission.try_acquire(p) for p in (full, first, second)]
    assert None not in held
    blocked = await queued(admission, (full,))  # ahead in line, but its pool stays full
    either = await queued(admission, (full, first, second))
    admission.release(held[2])  # `second` frees: the one waiting for `full` only is passed over
    await asyncio.sleep(0)
    assert not blocked.done() and (await either).name == "second"
    admission.release(held[1])
    admission.release(held[0])
    assert (await blocked).name == "full"
    again = await queued(admission, (full, first, second))  # all but `full` free: in order
    assert (await again).name == "first"


async def test_a_half_open_backend_takes_only_its_trial_requests_from_the_queue() -> None:
    """The half-open limit holds on the request path: a slot taken counts as a trial."""
    clock = ManualClock()
    breaker = CircuitBreaker(threshold=1, recovery_time=5, half_open_limit=1, clock=clock)
    backends = pool(max_concurrent=10, breaker=breaker)
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5, clock=clock)
    elsewhere = admission.try_acquire(pool("other"))  # released later: a release dispatches
    assert elsewhere is not None
    breaker.force_open()
    assert admission.try_acquire(backends) is None
    clock.advance(5)
    trial = admission.try_acquire(backends)
    assert trial is not None and breaker.state is BreakerState.HALF_OPEN
    assert admission.try_acquire(backends) is None  # one trial at a time
    waiting = await queued(admission, (backends,))
    admission.release(trial)
    await asyncio.sleep(0)
    assert not waiting.done()  # the trial's outcome is not known yet
    trial.record(OK, 0.1)  # the trial succeeded: the breaker closes
    admission.release(elsewhere)
    assert (await waiting) is trial and admission.in_flight == 1


async def test_a_client_that_leaves_the_moment_its_slot_comes_gives_the_slot_back() -> None:
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5)
    backends = pool()
    held = admission.try_acquire(backends)
    assert held is not None
    waiting = await queued(admission, (backends,))
    admission.release(held)  # hands the slot to the waiting request...
    waiting.cancel()  # ...whose client has just gone
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert admission.in_flight == 0 and held.active == 0 and admission.queued == 0
    assert admission.abandoned == 1


async def test_a_slot_that_frees_as_a_client_leaves_goes_to_the_next_in_line() -> None:
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5)
    backends = pool()
    held = admission.try_acquire(backends)
    assert held is not None
    leaving, next_in_line = (
        await queued(admission, (backends,)),
        await queued(admission, (backends,)),
    )
    leaving.cancel()  # its client has gone; the queue hears of it only when the task runs
    admission.release(held)
    await asyncio.sleep(0)
    assert next_in_line.done() and (await next_in_line) is held
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert admission.queued == 0 and admission.in_flight == 1 and admission.abandoned == 1


async def test_a_full_queue_and_a_timeout_refuse_and_count() -> None:
    admission = Admission(max_in_flight=10, queue_size=1, queue_timeout=0.05)
    backends = pool()
    held = admission.try_acquire(backends)
    assert held is not None
    waiting = await queued(admission, (backends,))
    with pytest.raises(QueueFull) as full:
        await admission.wait((backends,), ())
    assert full.value.headers["Retry-After"] == "1"
    with pytest.raises(QueueTimeout):
        await waiting
    assert admission.queued == 0 and admission.rejected_full == 1 and admission.timed_out == 1
    assert admission.in_flight == 1 and held.active == 1


async def test_retry_after_follows_the_measured_drain_rate() -> None:
    clock = ManualClock()
    admission = Admission(max_in_flight=100, queue_size=10, queue_timeout=5, clock=clock)
    assert admission.retry_after() == 5  # nothing measured yet: the queue timeout
    backends = pool(max_concurrent=100)
    for _ in range(3):
        admission.release(admission.try_acquire(backends))  # type: ignore[arg-type]
    clock.advance(0.5)
    assert admission.drain_rate() == 0.0  # too soon to tell
    clock.advance(0.1)
    assert admission.drain_rate() == pytest.approx(5.0)  # a first estimate at once
    assert admission.retry_after() == 1  # the next in line: 0.2 s, rounded up
    for _ in range(20):
        admission.release(admission.try_acquire(backends))  # type: ignore[arg-type]
    clock.advance(9.9)
    assert admission.drain_rate() == pytest.approx(5.0)  # then once per window
    clock.advance(0.1)
    assert admission.drain_rate() == pytest.approx(2.0)
    admission.queued = 5  # as if five were waiting: the sixth waits for them and itself
    assert admission.retry_after() == 3
    assert admission.snapshot()["drain_rate_per_s"] == 2.0
    admission.queued = 1000
    assert admission.retry_after() == 60  # at most a minute
    admission.queued = 0
    for _ in range(5):
        admission.release(admission.try_acquire(backends))  # type: ignore[arg-type]
    clock.advance(10.0)
    assert admission.retry_after() == 2  # 0.5 requests a second: 2 s for the next
    for _ in range(10):
        admission.release(admission.try_acquire(backends))  # type: ignore[arg-type]
    clock.advance(30.0)
    assert admission.snapshot()["drain_rate_per_s"] == 0.333  # 10 in 30 s, to 3 places
    assert Admission(1, 1, 0.2).retry_after() == 1 and Admission(1, 1, 500).retry_after() == 60


async def test_a_reload_that_raises_the_cap_serves_waiting_requests_at_once() -> None:
    admission = Admission(max_in_flight=1, queue_size=10, queue_timeout=5)
    held = admission.try_acquire(pool("a"))
    assert held is not None
    waiting = await queued(admission, (pool("b"),))
    admission.resize(1, 10, 5)
    await asyncio.sleep(0)
    assert not waiting.done()
    admission.resize(2, 20, 7)
    await asyncio.sleep(0)
    assert waiting.done() and (await waiting).name == "b" and admission.in_flight == 2
    assert (admission.max_in_flight, admission.queue_size, admission.queue_timeout) == (2, 20, 7)


async def test_a_waiting_request_is_served_when_a_breaker_lets_traffic_through_again() -> None:
    """No slot is released: the queue looks again every RECHECK_INTERVAL by itself."""
    clock = ManualClock()
    breaker = CircuitBreaker(threshold=1, recovery_time=5, clock=clock)
    backends = pool(breaker=breaker)
    admission = Admission(max_in_flight=10, queue_size=10, queue_timeout=5, clock=clock)
    breaker.force_open()
    waiting = await queued(admission, (backends,))
    await asyncio.sleep(0.15)
    assert not waiting.done()
    clock.advance(5)  # half-open now
    assert (await asyncio.wait_for(waiting, 0.5)) is backends.upstreams[0]
    assert admission.queued == 0 and admission.in_flight == 1


# --- through the gateway ---------------------------------------------------------------------


def one_slot_config(cluster: Cluster, **queue: object) -> dict:
    document = config_document(cluster, queue={"timeout": 5, **queue})
    document["models"]["mixtral-8x7b"]["max_concurrent"] = 1
    return document


async def post(
    http: aiohttp.ClientSession, gateway: RunningGateway, body: dict, headers: dict | None = None
) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        data = await response.json()
        return response.status, {**response.headers, "_body": data}, time.monotonic() - started


async def test_request_waits_for_a_free_slot_and_is_served(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster))
    cluster["mixtral-8x7b"].behaviour.latency = 0.3
    results = await asyncio.gather(*(post(http, gateway, chat("mixtral-8x7b")) for _ in range(3)))
    assert [status for status, _, _ in results] == [200, 200, 200]
    assert max(elapsed for _, _, elapsed in results) >= 0.85  # served one after another
    assert cluster["mixtral-8x7b"].behaviour.max_in_flight == 1
    assert gateway.router.models["mixtral-8x7b"].upstreams[0].active == 0


async def test_queue_full_is_503_at_once_with_retry_after(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, size=1))
    cluster["mixtral-8x7b"].behaviour.latency = 0.5
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    status, headers, elapsed = await post(http, gateway, chat("mixtral-8x7b"))
    assert status == 503 and elapsed < 0.05
    assert headers["_body"]["error"]["code"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    assert (await first)[0] == 200 and (await queued)[0] == 200


async def test_waiting_longer_than_queue_timeout_is_503(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, timeout=0.2))
    cluster["mixtral-8x7b"].behaviour.latency = 0.6
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    status, headers, elapsed = await post(http, gateway, chat("mixtral-8x7b"))
    assert status == 503 and 0.15 < elapsed < 0.5
    assert headers["_body"]["error"]["code"] == "queue_timeout"
    assert "Retry-After" in headers
    assert (await first)[0] == 200
    assert cluster["mixtral-8x7b"].behaviour.requests == 1


async def test_queued_client_that_disconnects_frees_its_place_and_uses_no_backend(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster, size=1))
    behaviour = cluster["mixtral-8x7b"].behaviour
    behaviour.latency = 0.5
    first = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    leaver = asyncio.create_task(post(http, gateway, chat("mixtral-8x7b")))
    await asyncio.sleep(0.1)
    assert gateway_admission(gateway).queued == 1
    leaver.cancel()
    await asyncio.sleep(0.1)
    assert gateway_admission(gateway).queued == 0
    status, _, _ = await post(http, gateway, chat("mixtral-8x7b"))  # the freed place is usable
    assert status == 200
    assert (await first)[0] == 200
    assert behaviour.requests == 2  # the leaver never reached the backend
    assert gateway_admission(gateway).abandoned == 1


async def test_high_priority_is_served_before_earlier_normal_requests(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(one_slot_config(cluster))
    cluster["mixtral-8x7b"].behaviour.latency = 0.2
    order: list[str] = []

    async def tagged(tag: str, priority: str, delay: float) -> None:
        await asyncio.sleep(delay)
        body = chat("mixtral-8x7b", content=tag)
        status, _, _ = await post(http, gateway, body, {"X-Priority": priority})
        assert status == 200
        order.append(tag)

    await asyncio.gather(
        tagged("busy", "normal", 0),
        tagged("low", "low", 0.05),
        tagged("normal", "normal", 0.07),
        tagged("high", "high", 0.09),
    )
    assert order == ["busy", "high", "normal", "low"]


async def test_global_cap_bounds_everything_in_flight(
    cluster: Cluster, start_gateway: StartGateway, http
) -> None:
    gateway = await start_gateway(config_document(cluster, routing={"max_concurrent_requests": 2}))
    for backend in cluster.backends.values():
        backend.behaviour.latency = 0.2
    results = await asyncio.gather(*(post(http, gateway, chat("auto")) for _ in range(6)))
    assert all(status == 200 for status, _, _ in results)
    assert sum(b.behaviour.max_in_flight for b in cluster.backends.values()) <= 4
    peak = max(elapsed for _, _, elapsed in results)
    assert peak >= 0.55  # three waves of two
    assert gateway_admission(gateway).in_flight == 0


def gateway_admission(gateway: RunningGateway):
    return gateway.runtime.admission
