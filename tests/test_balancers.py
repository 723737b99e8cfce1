"""Balancers on tiny pools: exact sequences, distributions within tolerance, and a conformance
suite every strategy must pass."""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balancers import registry
from balancers.adaptive import AdaptiveWeights
from balancers.base import Balancer, best_by, least_loaded, spare_capacity
from balancers.ensemble import check_voters, voting_strategies
from balancers.power_of_two import less_loaded
from balancers.prefix_affinity import AffinitySettings
from balancers.registry import (
    STRATEGIES,
    UnknownStrategyError,
    create_balancer,
    policy,
    strategy_names,
)
from circuit.breaker import CircuitBreaker
from health.stats import LatencyRing, OutcomeRing, PeakEwma


@dataclass(eq=False)
class Backend:
    """A backend as balancers see it: plain data plus the real latency and breaker types."""

    name: str
    weight: float = 1.0
    active: int = 0
    up: bool = True
    model: str | None = None
    max_concurrent: int = 100
    cost: float = 0.0
    quality: float = 0.5
    priority: int = 100
    specializations: frozenset[str] = frozenset()
    latency: PeakEwma = field(default_factory=PeakEwma)
    latencies: LatencyRing = field(default_factory=LatencyRing)
    outcomes: OutcomeRing = field(default_factory=OutcomeRing)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    def available(self) -> bool:
        return self.up and self.breaker.allows()


def pool(*weights: float) -> list[Backend]:
    return [Backend(chr(ord("a") + i), w) for i, w in enumerate(weights)]


def picks(strategy: str, backends: list[Backend], count: int, seed: int = 1) -> list[str]:
    balancer = create_balancer(strategy, backends, random.Random(seed))
    chosen = []
    for _ in range(count):
        backend = balancer.select(backends)
        assert backend is not None
        chosen.append(backend.name)
    return chosen


def test_round_robin_exact_sequence_skips_unavailable() -> None:
    backends = pool(1, 1, 1)
    balancer = create_balancer("round_robin", backends, random.Random(0))
    assert [balancer.select(backends).name for _ in range(4)] == ["a", "b", "c", "a"]
    backends[2].up = False
    assert [balancer.select(backends).name for _ in range(4)] == ["b", "a", "b", "a"]


def test_smooth_weighted_matches_nginx_sequence() -> None:
    # The example from nginx's commit introducing smooth weighted round robin (weights 5, 1, 1).
    assert "".join(picks("weighted", pool(5, 1, 1), 7)) == "aabacaa"


def test_smooth_weighted_exact_over_every_cycle_with_fractional_weights() -> None:
    backends = pool(1.0, 0.8, 0.6, 0.4)
    chosen = picks("weighted", backends, 14 * 10)
    assert "".join(chosen[:14]) == "abcdabacbadcba"  # nginx's sequence for weights 5:4:3:2
    for cycle in range(10):
        assert Counter(chosen[cycle * 14 : (cycle + 1) * 14]) == {"a": 5, "b": 4, "c": 3, "d": 2}


def test_weighted_alias() -> None:
    assert picks("weighted_round_robin", pool(2, 1), 3) == picks("weighted", pool(2, 1), 3)


def test_least_connections_picks_fewest_in_flight_and_breaks_ties_randomly() -> None:
    backends = pool(1, 1, 1)
    backends[0].active, backends[1].active, backends[2].active = 3, 1, 1
    counts = Counter(picks("least_connections", backends, 1000))
    assert set(counts) == {"b", "c"}
    assert abs(counts["b"] - 500) < 100


def test_power_of_two_prefers_the_less_loaded_of_its_two_samples() -> None:
    backends = pool(1, 1, 1)
    backends[0].active = 10
    counts = Counter(picks("power_of_two", backends, 3000))
    # "a" wins only when both samples... never: any pair containing "a" picks the other one.
    assert "a" not in counts
    assert abs(counts["b"] - 1500) < 200


def test_random_is_roughly_uniform() -> None:
    counts = Counter(picks("random", pool(1, 1, 1, 1), 4000))
    assert all(abs(n - 1000) < 150 for n in counts.values())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
class TestConformance:
    def test_never_picks_unavailable_or_excluded(self, strategy: str) -> None:
        backends = pool(1, 2, 3, 4)
        backends[1].up = False
        balancer = create_balancer(strategy, backends, random.Random(7))
        for _ in range(200):
            chosen = balancer.select(backends, exclude=(backends[3],))
            assert chosen in (backends[0], backends[2])

    def test_none_when_nothing_is_available(self, strategy: str) -> None:
        backends = pool(1, 1)
        for b in backends:
            b.up = False
        assert create_balancer(strategy, backends, random.Random(0)).select(backends) is None
        assert create_balancer(strategy, [], random.Random(0)).select([]) is None

    def test_single_backend_always_chosen(self, strategy: str) -> None:
        assert set(picks(strategy, pool(1), 10)) == {"a"}

    def test_every_backend_is_used(self, strategy: str) -> None:
        assert set(picks(strategy, pool(1, 1, 1), 300)) == {"a", "b", "c"}


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(UnknownStrategyError, match="valid strategies: round_robin, weighted"):
        create_balancer("fastest", [], random.Random(0))


@pytest.mark.parametrize("name", strategy_names())
def test_every_registered_strategy_conforms(name: str) -> None:
    """The registry's own list, so a policy module that registers itself is checked too:
    selectable by name, None on an empty pool, never an excluded or unavailable backend."""
    rng = random.Random(11)
    balancer = create_balancer(name, [], rng)
    assert isinstance(balancer, policy(name)) and isinstance(balancer, Balancer)
    assert balancer.select([]) is None
    backends = pool(1, 2, 3, 4, 5)
    balancer = create_balancer(name, backends, rng)
    for _ in range(300):
        for backend in backends:
            backend.up = rng.random() > 0.3
            backend.active = rng.randrange(5)
        exclude = set(rng.sample(backends, rng.randrange(3)))
        chosen = balancer.select(backends, exclude=exclude)
        allowed = [b for b in backends if b.up and b not in exclude]
        assert chosen in allowed if allowed else chosen is None


def test_capabilities_are_declared_on_every_strategy() -> None:
    for name in strategy_names():
        kind = policy(name)
        flags = (kind.uses_request, kind.cacheable, kind.cost_aware)
        assert all(isinstance(flag, bool) for flag in flags), name
    assert {n for n in strategy_names() if policy(n).cost_aware} == {
        "cost_optimized",
        "balanced",
        "ensemble",
    }
    assert {n for n in strategy_names() if policy(n).uses_request} == {
        "specialization",
        "prefix_affinity",
        "ensemble",
    }
    assert {n for n in strategy_names() if policy(n).cacheable} == {
        "cost_optimized",
        "quality_optimized",
        "priority",
        "specialization",
    }


def test_the_registry_imports_no_strategy() -> None:
    """Policies register themselves; the registry must not list them (no import cycle)."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {
        "__future__",
        "collections.abc",
        "typing",
        "balancers.base",
        "balancers.request",
    }


def test_best_by_ties_within_the_tolerance_and_least_loaded_reads_capacity() -> None:
    a, b, c = pool(1, 1, 1)
    scores = {"a": 1.0, "b": 0.95, "c": 0.5}
    seen = {best_by([a, b, c], lambda x: scores[x.name], random.Random(s), 0.05) for s in range(20)}
    assert {x.name for x in seen if x} == {"a", "b"}
    seen = {best_by([a, b, c], lambda x: scores[x.name], random.Random(s)) for s in range(20)}
    assert {x.name for x in seen if x} == {"a"}
    assert best_by([], lambda x: 0.0, random.Random(0)) is None
    a.max_concurrent, a.active = 10, 5  # half full
    b.max_concurrent, b.active = 100, 40  # less than half
    c.max_concurrent, c.active = 4, 3
    assert spare_capacity(a) == -0.5
    assert least_loaded([a, b, c], random.Random(0)) is b


def test_power_of_two_keeps_the_first_sample_on_a_tie() -> None:
    a, b = pool(1, 1)
    assert less_loaded(a, b) is a and less_loaded(b, a) is b
    b.active = 1
    assert less_loaded(b, a) is a


def test_smooth_weighted_gives_a_zero_weight_the_smallest_share_and_skips_excluded() -> None:
    backends = pool(1, 0, 1)
    chosen = picks("weighted", backends, 2001)
    assert Counter(chosen)["b"] == 1  # 1 of 2001: scaled to at least one thousandth
    backends = pool(1, 2, 1)
    balancer = create_balancer("weighted", backends, random.Random(0))
    chosen = [balancer.select(backends, (backends[0],)).name for _ in range(30)]
    assert Counter(chosen) == {"b": 20, "c": 10}  # the weights of those left, exactly


def test_round_robin_continues_after_the_last_pick_and_wraps() -> None:
    backends = pool(1, 1, 1)
    balancer = create_balancer("round_robin", backends, random.Random(0))
    assert balancer.select(backends, (backends[0],)).name == "b"
    assert balancer.select(backends).name == "c"
    assert balancer.select(backends, (backends[0],)).name == "b"


def test_registering_a_name_twice_is_refused_and_aliases_list_after_their_name() -> None:
    with pytest.raises(ValueError, match="'round_robin' registered twice"):
        registry.register("round_robin", order=99)(type("Other", (Balancer,), {}))
    assert registry.register("round_robin", order=1)(STRATEGIES["round_robin"])  # same: fine
    names = strategy_names()
    assert names.index("weighted_round_robin") == names.index("weighted") + 1
    assert names[:3] == ["round_robin", "weighted", "weighted_round_robin"]
    settings = registry.policy_settings()
    assert len(settings) == len(set(settings))  # each declared once, though aliases share
    assert all(kind is not None for _, kind in settings)  # only policies that declare some
    assert (None, AffinitySettings) in settings and (
        "adaptive_weights",
        AdaptiveWeights,
    ) in settings


def test_strategies_are_listed_in_their_declared_order_and_the_ensemble_never_votes() -> None:
    assert strategy_names() == [
        "round_robin",
        "weighted",
        "weighted_round_robin",
        "least_connections",
        "random",
        "power_of_two",
        "latency",
        "adaptive",
        "cost_optimized",
        "quality_optimized",
        "balanced",
        "priority",
        "specialization",
        "prefix_affinity",
        "ensemble",
    ]
    assert voting_strategies() == strategy_names()[:-1]
    with pytest.raises(ValueError, match="routing.ensemble.ensemble: not a strategy that can"):
        check_voters((("ensemble", 1.0),), "routing.ensemble")


def test_power_of_two_between_two_takes_the_less_loaded() -> None:
    backends = pool(1, 1)
    backends[0].active = 5
    assert set(picks("power_of_two", backends, 20)) == {"b"}
