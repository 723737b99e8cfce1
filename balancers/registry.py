"""Strategy name -> balancer class. Policies register themselves with `@register`; this module
imports none of them. balancers/__init__.py imports every module of the package once
(`load_all`), so a new policy is one new module and nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from balancers.base import Balancer
from balancers.request import StrategySettings

STRATEGIES: dict[str, type[Balancer]] = {}
_ORDER: dict[str, float] = {}  # name -> its place in listings

P = TypeVar("P", bound=type[Balancer])


def register(name: str, *, order: float, aliases: tuple[str, ...] = ()) -> Callable[[P], P]:
    """Make a policy selectable by `name` (and its aliases). `order` places it in the lists
    operators read (errors, the admin API): simplest first, aliases right after their name."""

    def add(policy: P) -> P:
        for index, key in enumerate((name, *aliases)):
            if key in STRATEGIES and STRATEGIES[key] is not policy:
                raise ValueError(f"strategy {key!r} registered twice")
            STRATEGIES[key] = policy
            _ORDER[key] = order + index / 100
        return policy

    return add


def load_all() -> None:
    """Import every module of the balancers package, so that each policy registers itself."""
    package = importlib.import_module("balancers")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"balancers.{module.name}")


class UnknownStrategyError(ValueError):
    def __init__(self, name: object) -> None:
        super().__init__(
            f"unknown strategy {name!r}; valid strategies: {', '.join(strategy_names())}"
        )
        self.name = name


def strategy_names() -> list[str]:
    return sorted(STRATEGIES, key=_ORDER.__getitem__)


def policy(name: str) -> type[Balancer]:
    """The class registered as `name` (its capabilities are class attributes)."""
    found = STRATEGIES.get(name)
    if found is None:
        raise UnknownStrategyError(name)
    return found


def policy_settings() -> list[tuple[str | None, type]]:
    """(key under `routing:` or None for routing itself, settings dataclass) of each registered
    policy that declares settings, once each, in listing order."""
    found: list[tuple[str | None, type]] = []
    for name in strategy_names():
        kind = STRATEGIES[name]
        if kind.settings_type is not None and (kind.settings_key, kind.settings_type) not in found:
            found.append((kind.settings_key, kind.settings_type))
    return found


def create_balancer(
    name: str,
    backends: Sequence[Any],
    rng: random.Random,
    settings: StrategySettings | None = None,
) -> Balancer:
    return policy(name)(backends, rng, settings)
