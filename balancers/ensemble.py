"""Ensemble: several strategies vote with configured weights; the backend with the most weight
wins (ties go to the heaviest voter's choice)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from balancers.base import B, Balancer, OptionalRequest
from balancers.registry import create_balancer, register, strategy_names
from balancers.request import StrategySettings
from balancers.settings import setting

Voters = tuple[tuple[str, float], ...]


def voting_strategies() -> list[str]:
    return [name for name in strategy_names() if name != "ensemble"]


def check_voters(voters: Voters, path: str) -> Voters:
    """Every voter a strategy that can vote (not the ensemble itself), and at least one."""
    valid = voting_strategies()
    for name, _ in voters:
        if name not in valid:
            raise ValueError(
                f"{path}.{name}: not a strategy that can vote (valid: {', '.join(valid)})"
            )
    if not voters:
        raise ValueError(f"{path}: needs at least one voting strategy")
    return voters


@dataclass(frozen=True, slots=True)
class EnsembleSettings:
    ensemble: Voters = setting(
        (("latency", 0.4), ("cost_optimized", 0.3), ("specialization", 0.3)),
        validate=check_voters,
        help="ensemble: voting strategies and their weights",
    )


@register("ensemble", order=14)
class Ensemble(Balancer):
    __slots__ = ("_voters",)
    uses_request = True
    cost_aware = True
    settings_type = EnsembleSettings

    def prepare(self, backends: Sequence[Any], settings: StrategySettings) -> None:
        voters = sorted(settings.of(EnsembleSettings).ensemble, key=lambda item: -item[1])
        self._voters: list[tuple[Balancer, float]] = [
            (create_balancer(name, backends, self._rng, settings), weight)
            for name, weight in voters
            if name != "ensemble"
        ]

    def select(
        self, backends: Sequence[B], exclude: Collection[B] = (), request: OptionalRequest = None
    ) -> B | None:
        """Voters see the whole pool: some of them keep state by position in it."""
        votes: dict[int, float] = {}
        order: list[B] = []
        for voter, weight in self._voters:
            choice = voter.select(backends, exclude, request)
            if choice is None:
                continue
            if id(choice) not in votes:
                order.append(choice)
            votes[id(choice)] = votes.get(id(choice), 0.0) + weight
        if not order:
            return None
        return max(order, key=lambda backend: votes[id(backend)])
