"""Which modules run compiled, and the guard that keeps an edited source from being shadowed.

setup.py compiles NATIVE_MODULES, the request path, to C with mypyc (issue 14): the same typed
Python, run without the bytecode loop. The request path is about a hundred small functions,
spread flat (callgrind), so no single rewrite would pay; compiled whole, a request costs about
a quarter fewer instructions (README, Performance). mypyc reads the type hints mypy already
checks: a class becomes a C struct, an attribute a load, a call between compiled functions a
C call. Cython, tried first, cost more on the same code, which declares no C types for it.
Which modules: those a request or a relayed chunk runs through. Left out: modules with async
generators (accounting, the access log: mypyc cannot compile them); the error classes and
control.access (compiled, the class keywords of their errors, `status=415`, did not take:
the tests caught it); balancers.base, whose Balancer the strategies left as Python extend.

In a source checkout (`pip install -e .`) each compiled module lies beside its source, and
Python's import system prefers it. An edited source would then be shadowed by its old
compiled module until the next build. `guard()`, called by every compiled package's
`__init__`, prevents that: when a compiled module is older than its source or missing, or
when REQUEST_ROUTER_PURE is set, every module of NATIVE_MODULES loads from its source. All of
them, not only the edited one: the compiled modules of one build call each other directly,
not through the import system. `state()` says which it is (the start-up line, the benchmarks).

A class of ours that extends one of aiohttp's (the responses, the protocol, the server, the
runner) stays a plain Python class, `@mypyc_attr(native_class=False)`, with compiled methods:
a native class cannot extend a class with `__slots__`. Its base is named through the module
that defines it (`import aiohttp.web_response`, then `aiohttp.web_response.StreamResponse`):
mypyc's C refers to that module, and does not build when the module was not imported by an
`import` statement of its own (`from aiohttp import web` or `web_response` is not enough).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path
from types import ModuleType

NATIVE_MODULES = (
    "proxy.attempt",
    "proxy.forward",
    "proxy.headers",
    "proxy.jsonbody",
    "proxy.retry",
    "proxy.rewrite",
    "proxy.router",
    "proxy.routes",
    "proxy.runtime",
    "proxy.server",
    "proxy.shared_counts",
    "proxy.state",
    "proxy.streaming",
    "proxy.transport",
    "proxy.upstream",
    "proxy.verdict",
    "telemetry.histogram",
    "telemetry.outcome",
    "telemetry.prometheus",
    "health.stats",
    "admission.constraints",
    "admission.queue",
    "admission.ratelimit",
    "admission.shedding",
    "circuit.breaker",
    "balancers.decisions",
    "balancers.least_connections",
    "balancers.power_of_two",
    "balancers.latency",
    "balancers.random_choice",
    "balancers.round_robin",
    "balancers.weighted",
)
PURE_SWITCH = "REQUEST_ROUTER_PURE"
ROOT = Path(__file__).resolve().parent

_state: str | None = None


def compiled_path(source: Path) -> Path:
    """Where the build puts the compiled module of `source` (this interpreter's suffix)."""
    return source.with_name(source.stem + EXTENSION_SUFFIXES[0])


def why_pure(root: Path = ROOT, modules: Sequence[str] = NATIVE_MODULES) -> str | None:
    """Why the compiled modules under `root` must not be used, or None when they may. The
    ages are compared only in a source checkout (a pyproject.toml beside the packages): an
    installed wheel's files all date from the install, in no set order."""
    if os.environ.get(PURE_SWITCH):
        return f"{PURE_SWITCH} is set"
    sources = [root.joinpath(*name.split(".")).with_suffix(".py") for name in modules]
    built = [compiled_path(source) for source in sources]
    missing = [path for path in built if not path.exists()]
    if len(missing) == len(built):
        return "not compiled (`pip install -e .` compiles it)"
    if missing:
        return f"{missing[0].name} is missing: rebuild with `pip install -e .`"
    if (root / "pyproject.toml").exists():
        for source, module in zip(sources, built, strict=True):
            if source.stat().st_mtime > module.stat().st_mtime:
                return (
                    f"{source.relative_to(root)} is newer than its compiled module:"
                    " rebuild with `pip install -e .`"
                )
    return None


def leftovers(root: Path = ROOT, modules: Sequence[str] = NATIVE_MODULES) -> list[Path]:
    """Compiled modules in a source checkout that the build no longer makes (taken off
    NATIVE_MODULES since). Such a module would load its own build's shared library, and with
    it that build's copies of every module in it, which then replace the current ones in
    sys.modules. setup.py deletes them; until then `guard` keeps them out."""
    if not (root / "pyproject.toml").exists():
        return []  # an installed wheel holds one build
    suffix = EXTENSION_SUFFIXES[0]
    found: list[Path] = []
    for package in root.iterdir():
        if not (package / "__init__.py").exists():
            continue
        for entry in package.iterdir():
            name = f"{package.name}.{entry.name.removesuffix(suffix)}"
            if entry.name.endswith(suffix) and name not in modules:
                found.append(entry)
    return found


class SourcesFirst:
    """A meta path finder that loads the named modules from their .py sources."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.names or not path:
            return None
        source = Path(path[0], fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


def guard() -> None:
    """Decide once per process, before the first compiled module is imported."""
    global _state
    if _state is not None:
        return
    reason = why_pure()
    kept_out = [f"{path.parent.name}.{path.name.split('.')[0]}" for path in leftovers()]
    if reason is None:
        _state = "compiled"
    else:
        _state = f"pure Python: {reason}"
        kept_out += NATIVE_MODULES
    if kept_out:
        sys.meta_path.insert(0, SourcesFirst(kept_out))


def state() -> str:
    """'compiled', or 'pure Python: <why>'."""
    guard()
    assert _state is not None
    return _state
