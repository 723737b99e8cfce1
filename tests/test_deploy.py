"""The systemd unit: it matches the gateway's signal semantics, passes systemd's own checks,
is hardened to an OK rating, checks the config before start and reload, and the gateway
speaks its readiness protocol (Type=notify) and runs under its system call filter."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml

from config.schema import ENV_OVERRIDES, ServerConfig
from simulator.cluster import Cluster
from tests.conftest import chat, config_document
from tests.process import free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "request-router.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "router_config.example.yaml"
ENV_FILE = ROOT / "deploy" / "request-router.env"
INSTALLED_BINARY = "/opt/request-router/.venv/bin/request-router"
INSTALLED_CONFIG = "/etc/request-router/router_config.yaml"
BINARY = Path(sys.executable).with_name("request-router")
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd is not installed (systemd-analyze)"
)


def directives(section: str = "Service") -> dict[str, list[str]]:
    """Every value of every key, in order: a unit may repeat a key (ExecReload=,
    SystemCallFilter=), which configparser would collapse to the last one."""
    found: dict[str, list[str]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def service(key: str) -> str:
    (value,) = directives()[key]
    return value


def unit_here(tmp_path: Path, binary: Path = BINARY) -> Path:
    """The unit with this checkout's console script where the install has its own."""
    assert BINARY.exists(), "the package's console script should be installed"
    unit = tmp_path / "request-router.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return unit


def test_unit_matches_signal_semantics() -> None:
    assert directives()["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service("KillSignal") == "SIGTERM"
    assert float(service("TimeoutStopSec")) > ServerConfig().shutdown_grace
    assert service("Restart") == "on-failure"
    assert int(service("LimitNOFILE")) >= 65536
    assert service("User") not in ("", "root")
    assert service("EnvironmentFile").lstrip("-") == "/etc/request-router/request-router.env"
    assert f"--config {INSTALLED_CONFIG}" in service("ExecStart")
    environment = re.findall(r"^#?(ROUTER_\w+)=", ENV_FILE.read_text(), re.MULTILINE)
    assert len(environment) >= 10 and set(environment) <= set(ENV_OVERRIDES)


def test_unit_checks_the_config_before_start_and_reload() -> None:
    start = service("ExecStart")
    assert service("Type") == "notify"
    assert service("ExecStartPre") == f"{start} --check-config"
    assert directives()["ExecReload"] == [f"{start} --check-config", "/bin/kill -HUP $MAINPID"]


def run_check(command: str, config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The unit's check command as written, with this checkout's script and `config`, run in
    `cwd` as the unit runs it in its WorkingDirectory."""
    line = command.replace(INSTALLED_BINARY, str(BINARY)).replace(INSTALLED_CONFIG, str(config))
    return subprocess.run(
        shlex.split(line), capture_output=True, text=True, cwd=cwd, timeout=60, env=os.environ
    )


def test_the_units_check_passes_the_example_config_and_names_what_is_wrong(
    tmp_path: Path,
) -> None:
    check = service("ExecStartPre")
    result = run_check(check, EXAMPLE_CONFIG, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vllm-0=http://10.0.0.11:8000" in result.stdout
    assert result.stdout.rstrip().endswith("configuration OK")

    broken = tmp_path / "broken.yaml"
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    example["routing"]["strategy"] = "fastest"
    example["logging"]["access_log"] = "/var/log/nowhere/access.log"
    broken.write_text(yaml.safe_dump(example))
    result = run_check(check, broken, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "routing.strategy" in result.stderr and "'fastest'" in result.stderr
    assert "Traceback" not in result.stderr

    example["routing"]["strategy"] = "round_robin"  # the file is valid; a file it names is not
    broken.write_text(yaml.safe_dump(example))
    result = run_check(check, broken, tmp_path)
    assert result.returncode == 2
    assert "logging.access_log: cannot create or write '/var/log/nowhere/access.log'" in (
        result.stderr
    )


@needs_systemd
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    broken = unit_here(tmp_path, tmp_path / "missing")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0  # the check really looks at the unit


EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d) (\w+)")


@needs_systemd
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    """systemd's bands: 0 PERFECT, < 1 SAFE, < 5 OK, < 7.5 MEDIUM (the unit was 7.1 before
    its hardening), then EXPOSED, UNSAFE, DANGEROUS. --threshold counts tenths."""
    help_text = subprocess.run(
        ["systemd-analyze", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    if "--offline" not in help_text:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (systemd < 250)")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=49", "--no-pager"]
        + [str(unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rating = EXPOSURE.search(result.stdout)
    assert rating is not None, result.stdout + result.stderr
    assert float(rating[1]) < 5.0 and rating[2] in ("OK", "SAFE", "PERFECT"), result.stdout
    assert result.returncode == 0, result.stderr


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket with SO_PASSCRED, so that, like systemd,
    the test learns which process sent each message (NotifyAccess= is about that)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    def receive(self, timeout: float = 15) -> tuple[int, dict[str, str]]:
        """(sender pid, {key: value}) of the next message."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(
            struct.unpack("iII", payload)[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        )
        return pid, dict(line.split("=", 1) for line in data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notified_gateway(
    tmp_path: Path, *arguments: str
) -> Iterator[tuple[subprocess.Popen[bytes], NotifySocket, int]]:
    """`python -m proxy` with $NOTIFY_SOCKET pointing at a socket this test reads, and no
    backends (readiness is about the gateway's own listener)."""
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "health_check": {"enabled": False},
                "accounting": {"enabled": False},
                "logging": {"audit_log": None},
                "models": {"m": {"url": "http://127.0.0.1:9"}},
            }
        )
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(config), *arguments],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process, notify, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()
        notify.close()


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_ready_once_listening_reloading_around_sighup_stopping_on_sigterm(
    tmp_path: Path,
) -> None:
    with notified_gateway(tmp_path) as (gateway, notify, port):
        sender, message = notify.receive()
        # At the moment READY=1 arrives the port must already take connections: no retry.
        assert message["READY"] == "1" and accepts_connections(port)
        assert sender == gateway.pid  # the main process: NotifyAccess=main would do
        assert message["STATUS"] == f"listening on http://127.0.0.1:{port}"

        gateway.send_signal(signal.SIGHUP)
        _, message = notify.receive()
        assert message["RELOADING"] == "1"
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < monotonic_us - int(message["MONOTONIC_USEC"]) < 10_000_000
        _, message = notify.receive()
        assert message["READY"] == "1"

        gateway.send_signal(signal.SIGTERM)
        _, message = notify.receive()
        assert message == {"STOPPING": "1", "STATUS": "draining"}
        assert gateway.wait(timeout=15) == 0
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def test_with_workers_the_supervisor_says_ready_once_every_worker_listens(
    tmp_path: Path,
) -> None:
    """The workers report to the supervisor, which speaks to systemd alone (NotifyAccess=main):
    READY=1 once both workers listen, RELOADING/READY around a SIGHUP, STOPPING on SIGTERM."""
    with notified_gateway(tmp_path, "--workers", "2") as (gateway, notify, port):
        sender, message = notify.receive()
        assert sender == gateway.pid
        assert message == {"READY": "1", "STATUS": "2 workers listening"}
        pids = set()
        for _ in range(40):  # both workers take connections by now: each answers one
            pids.add(worker_pid(port))
            if len(pids) == 2:
                break
        assert len(pids) == 2

        gateway.send_signal(signal.SIGHUP)
        sender, message = notify.receive()
        assert sender == gateway.pid and message["RELOADING"] == "1"
        sender, message = notify.receive()
        assert sender == gateway.pid and message == {"READY": "1", "STATUS": "reloaded"}

        gateway.send_signal(signal.SIGTERM)
        sender, message = notify.receive()
        assert sender == gateway.pid and message == {"STOPPING": "1", "STATUS": "draining"}
        assert gateway.wait(timeout=15) == 0
    assert service("NotifyAccess") == "main"


def worker_pid(port: int) -> int:
    """The pid of the worker that answers a request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return int(json.loads(answer.split(b"\r\n\r\n", 1)[1])["pid"])


def test_notify_does_nothing_without_a_socket_and_speaks_the_abstract_namespace() -> None:
    from proxy.systemd_notify import notify

    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    name = f"request-router-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert notify("READY=1", "STATUS=x", environ={"NOTIFY_SOCKET": f"@{name}"}) is True
        assert receiver.recv(4096) == b"READY=1\nSTATUS=x"
    # Nobody listening: reported, never raised (systemd's bookkeeping must not stop us).
    assert notify("READY=1", environ={"NOTIFY_SOCKET": f"@{name}"}) is False


# The unit's SystemCallFilter= and MemoryDenyWriteExecute=, applied without systemd: through
# libseccomp (which systemd itself uses) and Linux's PR_SET_MDWE (>= 6.3), so that a
# dependency that needs a denied system call or writable code fails here, not on a server.
UNSUPPORTED = 77
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """A systemd system call group, nested groups expanded, as `systemd-analyze
    syscall-filter` lists it for this systemd version."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(names)


def unit_syscalls() -> tuple[frozenset[str], int]:
    """The calls the unit allows and the errno the others get. Its first SystemCallFilter= is
    an allow-list (systemd adds @default to it); a later ~ list takes calls out again."""
    allowed: set[str] = set(syscall_group("@default"))
    denied: set[str] = set()
    for index, value in enumerate(directives()["SystemCallFilter"]):
        assert index > 0 or not value.startswith("~"), "expected an allow-list first"
        for group in value.removeprefix("~").split():
            (denied if value.startswith("~") else allowed).update(
                syscall_group(group) if group.startswith("@") else {group}
            )
    return frozenset(allowed - denied), getattr(errno, service("SystemCallErrorNumber"))


def exec_confined() -> None:
    """In a child process: confine it as the unit would, then exec sys.argv[1:]."""
    try:
        seccomp = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        sys.exit(UNSUPPORTED)
    allowed, error = unit_syscalls()
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_rule_add.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    filter_ = seccomp.seccomp_init(SCMP_ACT_ERRNO | error)
    for name in allowed:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # else not a call of this architecture
            assert seccomp.seccomp_rule_add(filter_, SCMP_ACT_ALLOW, number, 0) == 0, name
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(UNSUPPORTED)
    assert libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0  # the unit's NoNewPrivileges=yes
    assert seccomp.seccomp_load(filter_) == 0
    os.execv(sys.argv[1], sys.argv[1:])


@needs_systemd
async def test_the_gateway_serves_under_the_units_syscall_filter_and_wx_memory_ban(
    cluster: Cluster, tmp_path: Path
) -> None:
    port = free_port()
    admin_socket = tmp_path / "admin.sock"
    document = config_document(
        cluster,
        server={"port": port},
        accounting={"enabled": True, "sqlite_path": "data/requests.db", "flush_interval": 0.05},
        logging={"access_log": "access.log", "audit_log": "data/audit.jsonl"},
        admin={"listen": f"unix:{admin_socket}"},
    )
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(document))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    confined = [
        sys.executable,
        "-c",
        "from tests.test_deploy import exec_confined; exec_confined()",
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    # First, that the confinement is real: a denied call and a writable-executable mapping.
    probe = await asyncio.create_subprocess_exec(
        *confined,
        sys.executable,
        "-c",
        "import mmap, os\n"
        "for attempt in (lambda: os.setuid(0), lambda: mmap.mmap(-1, 4096, prot=7)):\n"
        "    try: attempt()\n"
        "    except OSError as e: print(e.errno)",
        env=environment,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await probe.communicate()
    if probe.returncode == UNSUPPORTED:
        pytest.skip("no libseccomp or no PR_SET_MDWE (Linux < 6.3) to confine the gateway")
    assert output.split() == [str(errno.EPERM).encode(), str(errno.EACCES).encode()]

    process = await asyncio.create_subprocess_exec(
        *confined,
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(config),
        cwd=tmp_path,
        env={**environment, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    loop = asyncio.get_running_loop()
    ready = loop.create_task(loop.sock_recv(notify, 4096))
    exited = loop.create_task(process.wait())
    try:
        await asyncio.wait({ready, exited}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert ready.done(), (await process.stdout.read()).decode()  # type: ignore[union-attr]
        assert ready.result().startswith(b"READY=1")

        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/chat/completions", json=chat()) as response:
                assert response.status == 200
            stream = chat("hermes-2", stream=True)
            async with http.post(f"{url}/v1/chat/completions", json=stream) as response:
                assert (await response.text()).rstrip().endswith("data: [DONE]")
            search = {"query_vector": [0.1, 0.2, 0.3], "collection": "documents"}
            async with http.post(f"{url}/api/v1/vectors/search", json=search) as response:
                assert response.status == 200
        connector = aiohttp.UnixConnector(path=str(admin_socket))
        async with aiohttp.ClientSession(connector=connector) as admin:
            body = {"strategy": "least_connections"}
            async with admin.put("http://localhost/api/v1/router/strategy", json=body) as response:
                assert response.status == 200
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        ready.cancel()
        notify.close()
        if process.returncode is None:
            process.kill()
        await exited
    output = (await process.stdout.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "configuration reloaded" in output
    assert len((tmp_path / "access.log").read_text().splitlines()) == 3
    assert "least_connections" in (tmp_path / "data" / "audit.jsonl").read_text()
    with closing(sqlite3.connect(tmp_path / "data" / "requests.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (3,)
