#!/usr/bin/env python3
"""Mutation testing of the modules that hold the resilience and balancing rules (issue 11, item 9).

One small change at a time (a comparison, an operator, a constant, `and`/`or`, a `not`, `min`/`max`,
`break`/`continue`, a deleted statement) is made to one module in a *copy* of the repository, and
that module's own tests run against it (`pytest -x`, with a timeout). A mutant the tests fail on
is killed; one they pass on survived: either the tests miss a behaviour or the change is
equivalent (no observable difference), and equivalents are listed below, with the reason, as data.

    python scripts/mutation.py                          # every module, sequentially
    python scripts/mutation.py --module circuit/breaker.py --module balancers/
    python scripts/mutation.py --list --module admission/queue.py   # the mutants, not run

Why our own small AST mutator rather than mutmut or cosmic-ray: mutmut 3 rewrites the whole
source tree into its own `mutants/` directory with trampolines and wants one test command for the
project, while each of our modules has its own focused tests; cosmic-ray needs a session database,
a config per module and a distributor. Both are more setup than the ~300 lines here, which map each
module to its tests, mutate a copy (never the working tree: others run tests there), and keep the
equivalent mutants in the same file as the report that lists them.

Not mutated, by rule: docstrings and other strings (messages), type annotations, `__slots__`,
`@dataclass(...)` flags,
default values in signatures (the composition root always passes the configured value; config's
own defaults are checked by tests/test_config.py), `assert`, logging calls and `__repr__`.

Speed: the parent imports pytest, its plugins and the third-party libraries once, then forks a
child per mutant, which imports our (mutated) code from the copy and runs pytest in-process
(~0.8 s per mutant before its first test instead of ~1.5 s for a new interpreter).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The config tests that read the policies' own settings (defaults, bounds, the README table).
SETTINGS_TESTS = (
    "tests/test_config.py::test_strategy_settings_are_read_from_routing",
    "tests/test_config.py::test_bad_strategy_settings_name_their_key",
    "tests/test_config.py::test_readme_configuration_table_is_rendered_from_the_declarations",
)
# What every policy declares to the registry: its capabilities and its place in listings.
REGISTRY_TESTS = (
    "tests/test_balancers.py::test_capabilities_are_declared_on_every_strategy",
    "tests/test_balancers.py::"
    "test_strategies_are_listed_in_their_declared_order_and_the_ensemble_never_votes",
)
# Module -> the tests that own its behaviour (pytest arguments: files or node ids).
TESTS: dict[str, tuple[str, ...]] = {
    "circuit/breaker.py": ("tests/test_breaker.py",),
    # The queue's own tests; of the gateway tests (real sleeps, seconds each) only the one
    # that checks the cap through the request path.
    "admission/queue.py": (
        "tests/test_queue.py",
        "-k",
        "not (waits_for_a_free_slot or queue_full_is_503 or longer_than_queue_timeout"
        " or client_that_disconnects or high_priority_is_served)",
    ),
    "admission/shedding.py": ("tests/test_shedding.py", "tests/test_limits.py"),
    "admission/ratelimit.py": ("tests/test_limits.py",),
    "proxy/retry.py": ("tests/test_retry.py",),
    "proxy/verdict.py": ("tests/test_verdict.py",),
    "health/active.py": (
        "tests/test_health.py",
        "tests/test_tls.py::test_health_probes_verify_with_the_same_ca",
    ),
    "health/stats.py": ("tests/test_health.py", "tests/test_verdict.py"),
    "balancers/adaptive.py": ("tests/test_strategies.py", *SETTINGS_TESTS, *REGISTRY_TESTS),
    "balancers/base.py": ("tests/test_balancers.py", "tests/test_strategies.py"),
    "balancers/by_model_traits.py": ("tests/test_strategies.py", *SETTINGS_TESTS, *REGISTRY_TESTS),
    "balancers/classify.py": ("tests/test_strategies.py",),
    "balancers/decisions.py": ("tests/test_strategies.py",),
    "balancers/ensemble.py": (
        "tests/test_strategies.py",
        "tests/test_balancers.py",
        *SETTINGS_TESTS,
    ),
    "balancers/latency.py": ("tests/test_strategies.py", "tests/test_balancers.py"),
    "balancers/least_connections.py": ("tests/test_balancers.py",),
    "balancers/power_of_two.py": ("tests/test_balancers.py",),
    "balancers/prefix_affinity.py": ("tests/test_strategies.py", *SETTINGS_TESTS, *REGISTRY_TESTS),
    "balancers/random_choice.py": ("tests/test_balancers.py",),
    "balancers/registry.py": ("tests/test_balancers.py",),
    "balancers/request.py": ("tests/test_strategies.py", *SETTINGS_TESTS),
    "balancers/round_robin.py": ("tests/test_balancers.py",),
    "balancers/settings.py": SETTINGS_TESTS,
    "balancers/specialization.py": ("tests/test_strategies.py", *REGISTRY_TESTS),
    "balancers/weighted.py": ("tests/test_balancers.py",),
}


def group_of(module: str) -> str:
    """Rates are reported per module and per group (the balancers are one group)."""
    return "balancers/" if module.startswith("balancers/") else module


REGISTRATION_TIE = (
    "the registry lists by order, and a tie keeps the registration order (modules load"
    " alphabetically, a module's imports first, classes in file order): the same list"
)
# Survivors judged equivalent: module -> {(scope, the mutated line stripped, the change): why}.
# A survivor that is not here is a gap in the tests.
EQUIVALENT: dict[str, dict[tuple[str, str, str], str]] = {
    "circuit/breaker.py": {
        ("CircuitBreaker.__init__", "self._opened_at = 0.0", "`0.0` -> `1.0`"): (
            "read only while open, and _open() sets it first"
        ),
        ("CircuitBreaker.__init__", "self._trials = 0", "`0` -> `1`"): (
            "read only while half-open, and turning half-open resets it"
        ),
        ("CircuitBreaker.record_success", "self._trials = 0", "`0` -> `1`"): (
            "read only while half-open, and turning half-open resets it"
        ),
        ("CircuitBreaker.record_success", "self._trials = 0", "delete `self._trials = 0`"): (
            "read only while half-open, and turning half-open resets it"
        ),
        (
            "CircuitBreaker.record_success",
            "self._open_for = self.recovery_time",
            "delete `self._open_for = self.recovery_time`",
        ): (
            "from closed the next trip is _open(longer=False), which sets the open time again;"
            " while closed it is not reported (snapshot: None)"
        ),
    },
    "admission/queue.py": {
        ("", 'PRIORITIES = {"high": 0, "normal": 1, "low": 2}', "`2` -> `3`"): (
            "only the order of the priorities is read"
        ),
        (
            "Waiter.__lt__",
            "return (self.priority, self.seq) < (other.priority, other.seq)",
            (
                "`(self.priority, self.seq) < (other.priority, other.seq)` -> "
                "`(self.priority, self.seq) <= (other.priority, other.seq)`"
            ),
        ): "seq is unique, so two waiters' keys are never equal",
        (
            "Admission.wait",
            "if future.done() and not future.cancelled():",
            (
                "`future.done() and not future.cancelled()` -> "
                "`future.done() or not future.cancelled()`"
            ),
        ): (
            "a cancelled task has cancelled its future: result() then raises the same"
            " CancelledError the branch re-raises"
        ),
        ("Admission.wait", "waiter.gone = True", "delete `waiter.gone = True`"): (
            "the waiter's future is done (cancelled or timed out) by then, and _dispatch skips"
            " done futures too"
        ),
        ("Admission.wait", "waiter.gone = True", "`True` -> `False`"): (
            "the waiter's future is done (cancelled or timed out) by then, and _dispatch skips"
            " done futures too"
        ),
        (
            "Admission._schedule_recheck",
            "if self._recheck is None and self.queued:",
            ("`self._recheck is None and self.queued` -> `self._recheck is None or self.queued`"),
        ): "both callers call it only while requests are queued",
        (
            "Admission._on_recheck",
            "self._heap = [w for w in self._heap if not w.gone]",
            "delete `self._heap = [w for w in self._heap if not w.gone]`",
        ): "frees memory only: with nothing queued every entry is gone, and _dispatch skips those",
        (
            "Admission._on_recheck",
            "self._heap = [w for w in self._heap if not w.gone]",
            ("`not w.gone` -> `w.gone`"),
        ): "frees memory only: with nothing queued every entry is gone, and _dispatch skips those",
    },
    "admission/shedding.py": {
        (
            "PoolWindow.__init__",
            "self._bucket = int(now / self._width)",
            "`now / self._width` -> `now * self._width`",
        ): (
            "the window is empty when made and record() adds to it at once: moving from a"
            " wrong bucket clears only empty ones"
        ),
        (
            "PoolWindow._advance",
            "return bucket % WINDOW_BUCKETS",
            ("`bucket % WINDOW_BUCKETS` -> `bucket // WINDOW_BUCKETS`"),
        ): "no caller reads the return value (add() computes its own index)",
        (
            "LoadShedder._decide",
            "if p and self._rng.random() < p and not probing(pool):",
            ("`self._rng.random() < p` -> `self._rng.random() <= p`"),
        ): "random() equal to p has probability zero",
    },
    "proxy/retry.py": {
        (
            "RetryBudget.try_withdraw",
            "if elapsed >= self.window:",
            ("`elapsed >= self.window` -> `elapsed > self.window`"),
        ): (
            "turning the window at exactly `window` seconds or an instant later: a recent"
            " window carries its counts over whole, so no withdrawal sees a different sum"
        ),
    },
    "health/active.py": {
        (
            "ActiveHealthChecker.stop",
            "await asyncio.gather(*self._tasks, return_exceptions=True)",
            "delete `await asyncio.gather(*self._tasks, return_exceptions=True)`",
        ): (
            "the cancelled loops end while stop() awaits the session's close: nothing is left"
            " running either way (the test checks every loop task is done)"
        ),
        ("ActiveHealthChecker.stop", "self._tasks = []", "delete `self._tasks = []`"): (
            "start() replaces the list; a second stop() gathers tasks that have ended"
        ),
        ("ActiveHealthChecker.stop", "self._session = None", "delete `self._session = None`"): (
            "a stopped checker is not used again, and closing a closed session is harmless"
        ),
        ("ActiveHealthChecker.check", "await response.read()", "delete `await response.read()`"): (
            "the verdict comes from the status alone; reading the body only lets the"
            " connection be kept alive for the next probe"
        ),
        (
            "ActiveHealthChecker.check",
            "upstream.last_response_ms = round((time.perf_counter() - started) * 1000, 3)",
            "`1000` -> `1001`",
        ): "0.1% of a reported response time, below the timing noise of any probe",
    },
    "health/stats.py": {
        ("PeakEwma.__init__", "self._stamp = 0.0", "`0.0` -> `1.0`"): (
            "read only once a sample is in, and the first sample sets it"
        ),
        (
            "PeakEwma.observe",
            "if value is None or seconds > value:",
            ("`seconds > value` -> `seconds >= value`"),
        ): "a sample equal to the average leaves it unchanged either way",
        ("LatencyRing.__init__", "self.values = [0.0] * SAMPLES", "`0.0` -> `1.0`"): (
            "only the first `count` values, all written, are read"
        ),
        ("LatencyRing.__init__", "self._p95 = 0.0", "`0.0` -> `1.0`"): (
            "the first read recomputes it (monotonic clocks are >= 0)"
        ),
        ("LatencyRing.__init__", "self._p95_at = -1.0", "`1.0` -> `2.0`"): (
            "the first read recomputes it either way (monotonic clocks are >= 0)"
        ),
        ("OutcomeRing.__init__", "self.ok = [True] * SAMPLES", "`True` -> `False`"): (
            "a slot is read (when the ring is full) only after it was written"
        ),
        ("OutcomeRing.__init__", "self.next = 0", "`0` -> `1`"): (
            "a ring may start anywhere: the oldest sample is always at `next`"
        ),
        (
            "OutcomeRing.add",
            "self.next = (self.next + 1) % SAMPLES",
            ("`self.next + 1` -> `self.next - 1`"),
        ): "a ring may turn either way: the oldest sample is always at `next`",
    },
    "balancers/adaptive.py": {
        ("Adaptive", '@register("adaptive", order=7)', "`7` -> `8`"): REGISTRATION_TIE,
    },
    "balancers/base.py": {
        ("Balancer.choose", "raise NotImplementedError", "delete `raise NotImplementedError`"): (
            "abstract: every policy that does not override select() overrides choose()"
        ),
    },
    "balancers/by_model_traits.py": {
        ("_ByKey.key", "raise NotImplementedError", "delete `raise NotImplementedError`"): (
            "abstract: every registered subclass defines key()"
        ),
        ("CostOptimized", '@register("cost_optimized", order=8)', "`8` -> `9`"): REGISTRATION_TIE,
        (
            "QualityOptimized",
            '@register("quality_optimized", order=9)',
            "`9` -> `10`",
        ): REGISTRATION_TIE,
        ("Priority", '@register("priority", order=11)', "`11` -> `12`"): REGISTRATION_TIE,
        ("Balanced.choose", "neutral = neutral_latency(candidates) or 0.0", "`0.0` -> `1.0`"): (
            "used only when no candidate has a latency: then every latency term is equal"
            " (normalised to 1) whatever the neutral value"
        ),
        (
            "Balanced.choose.score",
            "+ weights.load * (1.0 - backend.active / backend.max_concurrent)",
            ("`1.0` -> `2.0`"),
        ): "adds the same constant to every candidate's score: the order is unchanged",
    },
    "balancers/ensemble.py": {
        ("Ensemble", '@register("ensemble", order=14)', "`14` -> `15`"): (
            "the highest order either way: still listed last"
        ),
        ("Ensemble.select", "continue", "`continue` -> `break`"): (
            "voters see the same pool and exclusions: one finds no backend only when all do"
        ),
        ("Ensemble.select", "continue", "delete `continue`"): (
            "voters see the same pool and exclusions: one finds no backend only when all do,"
            " and then the vote for None returns None"
        ),
        (
            "Ensemble.select",
            "votes[id(choice)] = votes.get(id(choice), 0.0) + weight",
            "`0.0` -> `1.0`",
        ): "adds the same 1 to every backend that got a vote: the winner is unchanged",
    },
    "balancers/latency.py": {
        (
            "LatencyAware.better",
            "if abs(first_cost - second_cost) <= TIE * max(first_cost, second_cost):",
            "`abs(first_cost - second_cost) <= TIE * max(first_cost, second_cost)` -> "
            "`abs(first_cost - second_cost) < TIE * max(first_cost, second_cost)`",
        ): "costs exactly 5% apart: a float equality no measured latency hits",
        (
            "LatencyAware.better",
            "return second if second_cost < first_cost else first",
            "`second_cost < first_cost` -> `second_cost <= first_cost`",
        ): "equal costs are a tie, decided on the line before",
    },
    "balancers/least_connections.py": {
        (
            "LeastConnections",
            '@register("least_connections", order=3)',
            "`3` -> `4`",
        ): REGISTRATION_TIE,
    },
    "balancers/power_of_two.py": {
        ("PowerOfTwo", '@register("power_of_two", order=5)', "`5` -> `6`"): REGISTRATION_TIE,
    },
    "balancers/prefix_affinity.py": {
        ("PrefixAffinity.select", "continue", "delete `continue`"): (
            "a backend already looked at fails the same test again: the same result"
        ),
        ("PrefixAffinity.select", "seen.add(index)", "delete `seen.add(index)`"): (
            "the walk then goes once round the whole ring instead of stopping early: the same"
            " result, more work"
        ),
        ("PrefixAffinity.select", "break", "`break` -> `continue`"): (
            "the walk goes once round the whole ring instead of stopping early: the same"
            " result, more work"
        ),
        ("PrefixAffinity.select", "break", "delete `break`"): (
            "the walk goes once round the whole ring instead of stopping early: the same"
            " result, more work"
        ),
    },
    "balancers/registry.py": {
        ("register.add", "_ORDER[key] = order + index / 100", "`100` -> `101`"): (
            "aliases still sort right after their name (orders are whole numbers apart)"
        ),
    },
    "balancers/round_robin.py": {
        ("RoundRobin", '@register("round_robin", order=1)', "`1` -> `2`"): REGISTRATION_TIE,
    },
    "balancers/settings.py": {
        (
            "Setting",
            "positive: bool = False  # strictly above zero (weights); replaces `minimum`",
            ("`False` -> `True`"),
        ): "setting() passes every field of Setting: its defaults are never used",
    },
    "balancers/weighted.py": {
        ("SmoothWeighted.select", "best = -1", "`1` -> `2`"): (
            "any negative index means none chosen yet: `best < 0` reads the same"
        ),
        ("SmoothWeighted.prepare", "self._current = [0] * len(backends)", "`0` -> `1`"): (
            "every current weight starts 1 higher: the same argmax at every pick"
        ),
    },
    "proxy/verdict.py": {
        (
            "_status_table",
            "table = [BACKEND_FAILED] * 100 + [OK] * 500  # below 100 is no HTTP status at all",
            "`500` -> `501`",
        ): ("of_status reads the table only below 600; the extra entry is never read"),
        ("_status_table", "for status in range(400, 500):", "`500` -> `501`"): (
            "status 500 is then set again by the 5xx loop below"
        ),
        (
            "of_status",
            "return _BY_STATUS[status] if 0 <= status < 600 else BACKEND_FAILED",
            ("`0 <= status < 600` -> `0 < status < 600`"),
        ): "status 0 is BACKEND_FAILED either way (the table's first 100 entries)",
        (
            "of_status",
            "return _BY_STATUS[status] if 0 <= status < 600 else BACKEND_FAILED",
            ("`0` -> `1`"),
        ): "status 0 is BACKEND_FAILED either way (the table's first 100 entries)",
    },
}

COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
}
CALL_SWAPS = {"min": "max", "max": "min"}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position of the mutated node in ast.walk order
    variant: int  # which change of that node
    line: int
    scope: str  # the enclosing class and function, "" at module level
    source_line: str
    change: str

    @property
    def key(self) -> tuple[str, str, str]:
        """How EQUIVALENT names a mutant: stable while lines move."""
        return (self.scope, self.source_line, self.change)


@dataclass
class ModuleResult:
    module: str
    killed: list[Mutant] = field(default_factory=list)
    timeout: list[Mutant] = field(default_factory=list)
    survived: list[Mutant] = field(default_factory=list)
    equivalent: list[tuple[Mutant, str]] = field(default_factory=list)
    seconds: float = 0.0
    broken: bool = False  # its tests fail unmutated: nothing was run

    @property
    def total(self) -> int:
        return len(self.killed) + len(self.timeout) + len(self.survived) + len(self.equivalent)

    @property
    def detected(self) -> int:
        return len(self.killed) + len(self.timeout)

    def score(self) -> float:
        """Killed (or timed out) of the mutants that are not equivalent."""
        judged = self.total - len(self.equivalent)
        return self.detected / judged if judged else 1.0


# --- finding and applying mutations ------------------------------------------------------------


def _skipped_nodes(tree: ast.Module) -> tuple[set[int], set[int]]:
    """ids of the nodes not mutated, by rule (see the module docstring), and of the statements
    not deleted."""
    skipped: set[int] = set()
    undeletable: set[int] = set()

    def skip(node: ast.AST | None) -> None:
        if node is not None:
            skipped.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name == "__repr__":
                skip(node)
            for default in [*node.args.defaults, *node.args.kw_defaults]:
                skip(default)
            if node.name == "__init__":  # deleting `self.x = ...` there is a trivial kill
                undeletable.update(id(s) for s in node.body if isinstance(s, ast.Assign))
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                skip(arg.annotation)
            skip(node.args.vararg)
            skip(node.args.kwarg)
            skip(node.returns)
        elif isinstance(node, ast.AnnAssign):
            skip(node.annotation)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            skip(node)
        elif isinstance(node, ast.Assert | ast.Import | ast.ImportFrom):
            skip(node)
        elif isinstance(node, ast.Expr) and _is_docstring_or_log(node.value):
            skip(node)
        elif isinstance(node, ast.Subscript) and _is_typing(node.value):
            skip(node)
        elif isinstance(node, ast.ClassDef):
            for decorator in node.decorator_list:  # @dataclass(frozen=True, slots=True)
                if (
                    isinstance(decorator, ast.Call)
                    and getattr(decorator.func, "id", "") == "dataclass"
                ):
                    skip(decorator)
    return skipped, undeletable


def _is_docstring_or_log(value: ast.expr) -> bool:
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return True
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == "log"
    )


def _is_typing(value: ast.expr) -> bool:
    name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", "")
    return name in {"Annotated", "Callable", "TypeVar", "Final", "ClassVar", "tuple", "dict"}


def _is_string(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


def _deletable(node: ast.stmt) -> bool:
    """Statements whose deletion is a meaningful mutant (not a trivial NameError)."""
    if isinstance(node, ast.AugAssign | ast.Raise | ast.Continue | ast.Break):
        return True
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Call | ast.Await)
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Attribute | ast.Subscript) for t in node.targets)
    return False


def _variants(node: ast.AST) -> list[tuple[str, Callable[[ast.AST], ast.AST]]]:
    """The changes this node allows: (what the change is called, how to make it)."""
    found: list[tuple[str, Callable[[ast.AST], ast.AST]]] = []
    if isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            swap = COMPARE_SWAPS.get(type(op))
            if swap is not None:

                def compare(n: ast.AST, position: int = position, swap: type = swap) -> ast.AST:
                    assert isinstance(n, ast.Compare)
                    n.ops[position] = swap()
                    return n

                found.append(("compare", compare))
    elif isinstance(node, ast.BinOp) and not (_is_string(node.left) or _is_string(node.right)):
        swap_op = BINOP_SWAPS.get(type(node.op))
        if swap_op is not None:

            def binop(n: ast.AST, swap: type = swap_op) -> ast.AST:
                assert isinstance(n, ast.BinOp)
                n.op = swap()
                return n

            found.append(("operator", binop))
    elif isinstance(node, ast.AugAssign):
        swap_aug = BINOP_SWAPS.get(type(node.op))
        if swap_aug is not None:

            def augmented(n: ast.AST, swap: type = swap_aug) -> ast.AST:
                assert isinstance(n, ast.AugAssign)
                n.op = swap()
                return n

            found.append(("operator", augmented))
    elif isinstance(node, ast.BoolOp):

        def boolean(n: ast.AST) -> ast.AST:
            assert isinstance(n, ast.BoolOp)
            n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
            return n

        found.append(("boolean", boolean))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        found.append(("unary", lambda n: n.operand if isinstance(n, ast.UnaryOp) else n))
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes):
        value = node.value
        if isinstance(value, bool):
            found.append(("constant", lambda n: ast.Constant(not value)))
        elif isinstance(value, int | float):
            found.append(("constant", lambda n: ast.Constant(value + 1)))
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in CALL_SWAPS
    ):

        def call(n: ast.AST) -> ast.AST:
            assert isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            n.func = ast.Name(CALL_SWAPS[n.func.id], ast.Load())
            return n

        found.append(("call", call))
    elif isinstance(node, ast.Continue):
        found.append(("jump", lambda n: ast.Break()))
    elif isinstance(node, ast.Break):
        found.append(("jump", lambda n: ast.Continue()))
    if isinstance(node, ast.stmt) and _deletable(node):
        found.append(("delete", lambda n: ast.Pass()))
    return found


def mutants_of(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    skipped, undeletable = _skipped_nodes(tree)
    lines = source.splitlines()
    scopes = _scopes(tree)
    found: list[Mutant] = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skipped or not hasattr(node, "lineno"):
            continue
        for variant, (kind, make) in enumerate(_variants(node)):
            if kind == "delete" and id(node) in undeletable:
                continue
            before = _one_line(ast.get_source_segment(source, node) or ast.unparse(node))
            after = make(copy.deepcopy(node))
            change = (
                f"delete `{before}`"
                if isinstance(after, ast.Pass)
                else f"`{before}` -> `{_one_line(ast.unparse(after))}`"
            )
            line = node.lineno
            scope = scopes.get(id(node), "")
            found.append(
                Mutant(module, index, variant, line, scope, lines[line - 1].strip(), change)
            )
    return sorted(found, key=lambda m: (m.line, m.index, m.variant))


def _scopes(tree: ast.Module) -> dict[int, str]:
    """id(node) -> the dotted name of the classes and functions around it."""
    found: dict[int, str] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            found[id(child)] = inner
            visit(child, inner)

    visit(tree, "")
    return found


def _one_line(text: str) -> str:
    return " ".join(text.split())


def mutated_source(source: str, mutant: Mutant) -> str:
    tree = ast.parse(source)
    nodes = list(ast.walk(tree))
    node = nodes[mutant.index]
    _, make = _variants(node)[mutant.variant]
    replacement = make(copy.deepcopy(node))
    for parent in nodes:
        for name, value in ast.iter_fields(parent):
            if value is node:
                setattr(parent, name, replacement)
            elif isinstance(value, list):
                for position, item in enumerate(value):
                    if item is node:
                        value[position] = replacement
    ast.copy_location(replacement, node)
    return ast.unparse(ast.fix_missing_locations(tree))


# --- running the tests in a copy ---------------------------------------------------------------

# pytest's plugins too: their asserts then go unrewritten, and the child says that is fine
# (CHILD_OPTIONS). Hypothesis's plugin is left out: none of these tests uses it.
PREIMPORTED = (
    "pytest_asyncio",
    "pytest_aiohttp",
    "pytest_timeout",
    "pytest",
    "aiohttp",
    "aiohttp.web",
    "aiohttp_retry",
    "yaml",
    "orjson",
    "uvloop",
    "prometheus_client",
    "prometheus_async",
    "aiosqlite",
    "asyncpg",
    "httptools",
)


CHILD_OPTIONS = (
    "-x",
    "-q",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:randomly",
    "-p",
    "no:hypothesispytest",
    "-W",
    "ignore::pytest.PytestAssertRewriteWarning",
)


def copy_repository(target: Path) -> Path:
    tree = target / "repo"
    shutil.copytree(
        REPO,
        tree,
        # Without the compiled modules (native.py): the copy runs the mutated sources.
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", "test-artifacts", ".mypy_cache", "*.so"
        ),
    )
    return tree


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """'killed', 'survived' or 'timeout', and the seconds it took. The child imports our code
    from `tree` (first on sys.path), never from the working tree."""
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: run pytest in-process and leave without cleanup
        code = 3
        try:
            os.setpgid(0, 0)
            os.chdir(tree)
            sys.path.insert(0, str(tree))
            log = os.open(tree.parent / "last-run.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            import pytest

            args = [*CHILD_OPTIONS, *tests]
            code = int(pytest.main(args))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = started + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            elapsed = time.monotonic() - started
            return ("survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"), elapsed
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - started
        time.sleep(0.01)


def test_module(
    tree: Path, module: str, mutants: list[Mutant], timeout_factor: float, progress: bool
) -> ModuleResult:
    path = tree / module
    original = path.read_text()
    tests = TESTS[module]
    result = ModuleResult(module)
    started = time.monotonic()
    outcome, baseline = run_tests(tree, tests, 300)
    if outcome != "survived":
        output = (tree.parent / "last-run.log").read_text()[-2000:]
        print(f"{module}: NOT RUN, its tests fail without any mutation:\n{output}", file=sys.stderr)
        result.broken = True
        return result
    timeout = max(10.0, timeout_factor * baseline)
    try:
        path.write_text("raise RuntimeError('mutation canary')\n")
        if run_tests(tree, tests, timeout)[0] == "survived":
            raise SystemExit(f"{module}: the tests do not import it from the copy")
        equivalent = EQUIVALENT.get(module, {})
        for number, mutant in enumerate(mutants, 1):
            path.write_text(mutated_source(original, mutant))
            outcome, _ = run_tests(tree, tests, timeout)
            if outcome == "killed":
                result.killed.append(mutant)
            elif outcome == "timeout":
                result.timeout.append(mutant)
            elif mutant.key in equivalent:
                result.equivalent.append((mutant, equivalent[mutant.key]))
            else:
                result.survived.append(mutant)
            if progress:
                print(f"\r  {module}: {number}/{len(mutants)}", end="", file=sys.stderr)
    finally:
        path.write_text(original)
    if progress:
        print(file=sys.stderr)
    result.seconds = time.monotonic() - started
    return result


# --- the report --------------------------------------------------------------------------------


def report(results: list[ModuleResult]) -> Iterator[str]:
    yield "| module | mutants | killed | timeout | survived | equivalent | score | seconds |"
    yield "|---|---:|---:|---:|---:|---:|---:|---:|"
    for r in results:
        if r.broken:
            yield f"| {r.module} | not run: its tests fail without any mutation |||||||"
            continue
        yield (
            f"| {r.module} | {r.total} | {len(r.killed)} | {len(r.timeout)} | {len(r.survived)}"
            f" | {len(r.equivalent)} | {r.score():.0%} | {r.seconds:.0f} |"
        )
    groups: dict[str, list[ModuleResult]] = {}
    for r in results:
        groups.setdefault(group_of(r.module), []).append(r)
    yield ""
    yield "Score per group (killed or timed out, of the mutants not judged equivalent):"
    for name, members in groups.items():
        detected = sum(r.detected for r in members)
        judged = sum(r.total - len(r.equivalent) for r in members)
        yield f"  {name}: {detected}/{judged} = {detected / judged if judged else 1:.1%}"
    detected = sum(r.detected for r in results)
    judged = sum(r.total - len(r.equivalent) for r in results)
    yield f"  all: {detected}/{judged} = {detected / judged if judged else 1:.1%}"
    survivors = [m for r in results for m in r.survived]
    yield ""
    yield f"Survivors ({len(survivors)}): gaps in the tests"
    for m in survivors:
        yield f"  {m.module}:{m.line} ({m.scope}): {m.change}"
    equivalents = [e for r in results for e in r.equivalent]
    yield ""
    yield f"Equivalent ({len(equivalents)}):"
    for m, why in equivalents:
        yield f"  {m.module}:{m.line} ({m.scope}): {m.change}\n      {why}"
    listed = {(module, key) for module, keys in EQUIVALENT.items() for key in keys}
    seen = {(m.module, m.key) for r in results for m, _ in r.equivalent}
    ran = {r.module for r in results}
    stale = sorted(k for k in listed - seen if k[0] in ran)
    if stale:
        yield ""
        yield "Listed as equivalent but not a survivor now (killed, or the line changed):"
        for module, (scope, line, change) in stale:
            yield f"  {module} ({scope}): {line!r}: {change}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        help="a module path or a prefix (balancers/); repeatable; default: all",
    )
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--timeout-factor",
        type=float,
        default=3.0,
        help="a mutant's tests time out after this x the unmutated run (at least 10 s)",
    )
    args = parser.parse_args()
    modules = [m for m in TESTS if not args.module or any(m.startswith(p) for p in args.module)]
    if not modules:
        parser.error(f"no module matches {args.module}")
    planned = {m: mutants_of(m, (REPO / m).read_text()) for m in modules}
    if args.list:
        for module, mutants in planned.items():
            for m in mutants:
                print(f"{module}:{m.line} ({m.scope}): {m.change}")
        print(f"{sum(len(m) for m in planned.values())} mutants")
        for module, mutants in planned.items():
            keys = {m.key for m in mutants}
            for key in EQUIVALENT.get(module, {}):
                if key not in keys:
                    print(f"listed as equivalent but no such mutant: {module} {key}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the copy is removed
    for name in PREIMPORTED:  # once, here, instead of once per mutant in each child
        __import__(name)
    results: list[ModuleResult] = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        tree = copy_repository(Path(scratch))
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant must never run a stale .pyc
        sys.dont_write_bytecode = True
        for module in modules:
            results.append(
                test_module(tree, module, planned[module], args.timeout_factor, sys.stderr.isatty())
            )
            done = results[-1]
            print(f"{module}: {done.score():.0%}", file=sys.stderr)
            for m in done.survived:
                print(f"  {m.line} ({m.scope}): {m.source_line!r}: {m.change}", file=sys.stderr)
            sys.stderr.flush()
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
