"""The compiled request path (native.py): the install compiles it; an edited source is never
shadowed by its old compiled module; and the gateway serves the same on pure Python, where a
failed build or REQUEST_ROUTER_PURE leaves it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

import native
from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import ROOT, gateway_process

HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None


def source_of(name: str, root: Path = ROOT) -> Path:
    return root.joinpath(*name.split(".")).with_suffix(".py")


BUILT = all(native.compiled_path(source_of(name)).exists() for name in native.NATIVE_MODULES)


def loaded_from(*modules: str, env: dict[str, str] | None = None) -> list[str]:
    """native.state() and each module's file, as a fresh interpreter in the checkout sees them."""
    code = (
        "import importlib, native\n"
        f"modules = [importlib.import_module(name) for name in {list(modules)!r}]\n"
        "print(native.state())\n"
        "for module in modules: print(module.__file__)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != native.PURE_SWITCH}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: the install stays pure Python")
@pytest.mark.skipif(bool(os.environ.get(native.PURE_SWITCH)), reason="REQUEST_ROUTER_PURE set")
def test_the_install_compiles_the_request_path() -> None:
    state, *files = loaded_from(*native.NATIVE_MODULES)
    assert state == "compiled"
    assert files == [str(native.compiled_path(source_of(name))) for name in native.NATIVE_MODULES]


@pytest.fixture
def edited_source() -> Iterator[Path]:
    """proxy/verdict.py made newer than its compiled module, as an edit makes it; its times
    are put back afterwards (the content is never touched)."""
    source = ROOT / "proxy" / "verdict.py"
    times = source.stat()
    built = native.compiled_path(source).stat()
    os.utime(source, (times.st_atime, built.st_mtime + 5))
    try:
        yield source
    finally:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns))


@pytest.mark.skipif(not BUILT, reason="the request path is not compiled here")
def test_an_edited_source_is_not_shadowed_by_its_old_compiled_module(edited_source) -> None:
    # The edited module and every other module of the compiled group load from source: the
    # compiled ones call each other directly and would keep running the old code.
    state, verdict, transport = loaded_from("proxy.verdict", "proxy.transport")
    assert state.startswith("pure Python: proxy/verdict.py is newer than its compiled module")
    assert verdict == str(edited_source)
    assert transport == str(ROOT / "proxy" / "transport.py")


def test_the_switch_turns_the_compiled_modules_off() -> None:
    state, transport = loaded_from("proxy.transport", env={native.PURE_SWITCH: "1"})
    assert state == "pure Python: REQUEST_ROUTER_PURE is set"
    assert transport == str(ROOT / "proxy" / "transport.py")


def fake_checkout(root: Path, modules: list[str], built: list[str]) -> Path:
    """Empty sources, and empty compiled modules a moment newer, for the ages and presence
    that the guard reads."""
    root.mkdir()
    (root / "pyproject.toml").write_text("")
    for name in modules:
        source = source_of(name, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("")
        os.utime(source, (1_000, 1_000))
    for name in built:
        module = native.compiled_path(source_of(name, root))
        module.write_bytes(b"")
        os.utime(module, (2_000, 2_000))
    return root


def test_half_a_build_is_not_used(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(native.PURE_SWITCH, raising=False)
    modules = ["pkg.a", "pkg.b"]
    half = fake_checkout(tmp_path / "half", modules, built=["pkg.a"])
    reason = native.why_pure(half, modules)
    missing = native.compiled_path(Path("b.py"))
    assert reason == f"{missing} is missing: rebuild with `pip install -e .`"
    none = fake_checkout(tmp_path / "none", modules, built=[])
    assert native.why_pure(none, modules) == "not compiled (`pip install -e .` compiles it)"
    whole = fake_checkout(tmp_path / "whole", modules, built=modules)
    assert native.why_pure(whole, modules) is None


def test_an_installed_wheel_is_trusted_whatever_its_files_ages(tmp_path, monkeypatch) -> None:
    # pip writes a wheel's files in no set order: a source may be a moment newer than its
    # compiled module there, and nobody edits site-packages.
    monkeypatch.delenv(native.PURE_SWITCH, raising=False)
    modules = ["pkg.a"]
    root = fake_checkout(tmp_path / "tree", modules, built=modules)
    os.utime(root / "pkg" / "a.py", (3_000, 3_000))
    reason = native.why_pure(root, modules)
    assert reason is not None and reason.startswith("pkg/a.py is newer")  # in a checkout
    (root / "pyproject.toml").unlink()
    assert native.why_pure(root, modules) is None


def test_a_module_taken_off_the_list_is_a_leftover_to_keep_out(tmp_path) -> None:
    # Its compiled file would load its own build's library, and that build's copies of every
    # module in it would replace the current ones.
    root = fake_checkout(tmp_path / "tree", ["pkg.a", "pkg.b"], built=["pkg.a", "pkg.b"])
    (root / "pkg" / "__init__.py").write_text("")
    assert native.leftovers(root, ["pkg.a", "pkg.b"]) == []
    assert native.leftovers(root, ["pkg.a"]) == [native.compiled_path(root / "pkg" / "b.py")]


async def test_the_gateway_serves_on_pure_python(cluster: Cluster, tmp_path) -> None:
    """Where a build failed or REQUEST_ROUTER_PURE is set: the same answers, said at start."""
    env = {native.PURE_SWITCH: "1"}
    async with gateway_process(config_document(cluster), tmp_path, env) as gateway:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{gateway.url}/v1/chat/completions", json=chat()) as response:
                assert response.status == 200
                assert (await response.json())["choices"][0]["message"]["content"]
            body = {**chat(), "stream": True}
            async with http.post(f"{gateway.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                assert (await response.read()).endswith(b"data: [DONE]\n\n")
        gateway.signal(signal.SIGTERM)
        output = await gateway.output()
    assert "request path pure Python: REQUEST_ROUTER_PURE is set" in output
