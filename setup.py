"""The build: everything is in pyproject.toml but the compiled request path (native.py), whose
modules mypyc turns into C extensions here. They build all or none: a C build that fails (no
compiler, no Python headers) leaves the gateway on pure Python, slower but whole, and says so.
mypyc's own errors (code it cannot compile) fail the install, as a type error fails CI: they
come from the code, not from the machine. REQUEST_ROUTER_PURE=1 skips compiling."""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from native import NATIVE_MODULES, PURE_SWITCH, compiled_path, leftovers  # noqa: E402  (the one list)

FALLBACK = "the request path stays pure Python"


def native_extensions() -> list[Extension]:
    if os.environ.get(PURE_SWITCH):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print(f"warning: mypyc is not installed: {FALLBACK}", file=sys.stderr)
        return []
    sources = [name.replace(".", "/") + ".py" for name in NATIVE_MODULES]
    # mypyc type-checks as it compiles, with pyproject's strict settings. The build runs
    # before the project's dependencies are installed, so what the build environment lacks
    # (pyproject's build requires hold the libraries whose types shape the compiled code) is
    # Any here, and strictness about Any is CI's mypy run's job, not the build's.
    relaxed = ["--ignore-missing-imports", "--follow-imports=silent", "--no-warn-return-any"]
    return list(mypycify([*relaxed, *sources], opt_level="3"))


class BuildAllOrNone(build_ext):
    """mypyc makes one shared library for the group and one small module per source, which
    loads it: modules without their library would not import. So a failure of any drops
    them all, rather than leaving half (setuptools' `optional` is per extension). Built in
    place (`pip install -e .`), it also clears what earlier builds left in the checkout:
    compiled modules taken off the list (native.leftovers), other lists' libraries, and on
    a failure the earlier build's modules, which may no longer match the sources."""

    def run(self) -> None:
        root = Path(__file__).resolve().parent
        in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        earlier = set(root.glob("*__mypyc" + EXTENSION_SUFFIXES[0])) if in_place else set()
        for path in leftovers(root) if in_place else []:
            path.unlink()
        try:
            super().run()
        except Exception as exc:  # no compiler, a compile error
            print(f"warning: the compiled request path did not build: {exc}", file=sys.stderr)
            print(f"warning: {FALLBACK}", file=sys.stderr)
            self.extensions = []
            self.distribution.ext_modules = []
            if in_place:
                for name in NATIVE_MODULES:
                    source = root.joinpath(*name.split(".")).with_suffix(".py")
                    compiled_path(source).unlink(missing_ok=True)
        else:
            earlier -= {root / (ext.name + EXTENSION_SUFFIXES[0]) for ext in self.extensions}
        for path in earlier:
            path.unlink()


setup(ext_modules=native_extensions(), cmdclass={"build_ext": BuildAllOrNone})
