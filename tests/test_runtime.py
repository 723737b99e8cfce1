"""What a reload carries over, stated once in proxy.runtime, checked field by field."""

from __future__ import annotations

from config.schema import parse
from proxy.router import Router
from proxy.runtime import Runtime
from proxy.verdict import OK
from tests.conftest import ManualClock


def document(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "models": {"m": {"endpoints": [{"url": "http://127.0.0.1:9"}]}},
        "rate_limit": {"rps": 5},
    }
    return {**base, **changes}


def reload(runtime: Runtime, **changes: object) -> Runtime:
    config = parse(document(**changes), {})
    return runtime.reloaded(config, Router(config, previous=runtime.router))


def test_reload_keeps_the_state_and_retunes_the_limits() -> None:
    clock = ManualClock()
    config = parse(document(), {})
    runtime = Runtime(config, Router(config, clock=clock), clock=clock)
    runtime.stats.retries = 7
    runtime.shedder.record("m", OK)
    runtime.retry.budget.requests = 40
    bucket = runtime.rate_limiter.global_bucket
    assert bucket is not None and bucket.take() == 0.0  # one token spent

    after = reload(runtime, routing={"max_concurrent_requests": 3}, retry={"budget_ratio": 0.5})

    assert after is not runtime and after.router is not runtime.router
    assert after.admission is runtime.admission and after.admission.max_in_flight == 3
    assert after.retry.budget is runtime.retry.budget and after.retry.budget.ratio == 0.5
    assert after.retry.budget.requests == 40
    assert after.shedder is runtime.shedder and after.shedder.windows["m"].requests == 1
    assert after.stats is runtime.stats and after.stats.retries == 7
    assert after.telemetry is runtime.telemetry
    # Limits unchanged: the same buckets, with the token already spent.
    assert after.rate_limiter is runtime.rate_limiter
    assert after.rate_limiter.global_bucket is not None
    assert after.rate_limiter.global_bucket.tokens < 5
    assert after.router.upstreams[0] is runtime.router.upstreams[0]  # same backend, same state
    assert "strategy=round_robin" in repr(after) and "0 in flight of 3" in repr(after)


def test_a_changed_limit_gets_fresh_buckets_and_keeps_the_refusal_count() -> None:
    config = parse(document(), {})
    runtime = Runtime(config, Router(config))
    runtime.rate_limiter.limited = 4
    after = reload(runtime, rate_limit={"rps": 50})
    assert after.rate_limiter is not runtime.rate_limiter
    assert after.rate_limiter.limited == 4
    assert after.rate_limiter.global_bucket is not None
    assert after.rate_limiter.global_bucket.rate == 50
