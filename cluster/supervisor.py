"""`--workers N`: a supervisor process runs N workers that share the listening port.

The supervisor binds nothing itself: each worker opens the port with SO_REUSEPORT (the kernel
spreads connections across them) and a Unix socket in a private run directory for its siblings
(cluster.peers). Signals are passed on: SIGTERM/SIGINT drain every worker, SIGHUP makes every
worker reload. A worker that dies unexpectedly is started again (with a short pause, so a
crash loop does not spin); its row of the shared table (cluster.shared_table) keeps its spend
and grants, and loses its in-flight counts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cluster import shared_table
from proxy import systemd_notify

log = logging.getLogger("request_router.workers")

RESTART_PAUSE = 1.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the worker, before exec: if the supervisor dies, even by SIGKILL, the kernel sends
    this worker SIGTERM, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the supervisor's own cleanup still stops the workers
        pass


def supervise(argv: Sequence[str], workers: int) -> int:
    run_dir = tempfile.mkdtemp(prefix="request-router-")
    os.chmod(run_dir, 0o700)  # the sibling sockets are for the workers only
    environment = {
        **os.environ,
        "ROUTER_RUN_DIR": run_dir,
        "ROUTER_WORKERS_TOTAL": str(workers),
        "ROUTER_WORKER_THREADS": str(workers),
        "ROUTER_PEER_SECRET": secrets.token_hex(16),
    }
    command = [sys.executable, "-m", "proxy", *argv]
    # What the workers share (in-flight counts, limits, spend, hints): one row each.
    shared_table.create(run_dir, workers)
    table = shared_table.SharedTable(run_dir)

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            env={**environment, "ROUTER_WORKER_INDEX": str(index)},
            preexec_fn=die_with_parent,
        )

    # Under systemd (Type=notify) the workers report to the supervisor, which tells systemd
    # once: ready when every worker listens, reloading and ready again around a SIGHUP,
    # stopping on SIGTERM. So the unit can keep NotifyAccess=main.
    relay = NotifyRelay(run_dir, workers) if os.environ.get("NOTIFY_SOCKET") else None
    if relay is not None:
        environment["NOTIFY_SOCKET"] = str(relay.path)
    children = {index: start(index) for index in range(workers)}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            if relay is not None:
                relay.stopping()
        elif signum == signal.SIGHUP and relay is not None:
            relay.reloading()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info(
        "supervising %d workers (pids %s)",
        workers,
        ", ".join(str(c.pid) for c in children.values()),
    )
    try:
        while True:
            if stopping:
                codes = [child.wait() for child in children.values()]
                return 0 if all(code == 0 for code in codes) else 1
            for index, child in list(children.items()):
                code = child.poll()
                if code is not None and not stopping:
                    log.error(
                        "worker %d (pid %d) exited with %d; starting it again",
                        index,
                        child.pid,
                        code,
                    )
                    table.clear_in_flight(index)  # its requests died with it
                    time.sleep(RESTART_PAUSE)
                    children[index] = start(index)
            if relay is None:
                time.sleep(0.2)
            else:
                relay.receive({child.pid: index for index, child in children.items()}, 0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        table.close()
        if relay is not None:
            relay.close()
        shutil.rmtree(run_dir, ignore_errors=True)


class NotifyRelay:
    """The workers' sd_notify socket: their READY=1 messages, told apart by the sender's
    credentials (SO_PASSCRED), become one READY=1 from the supervisor to systemd."""

    def __init__(self, run_dir: str, workers: int) -> None:
        self.systemd = {"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"]}
        self.path = Path(run_dir) / "notify.sock"
        self.workers = workers
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.started: set[int] = set()  # worker indexes that have listened once
        self.ready_sent = False
        self.reload_pending: set[int] = set()

    def receive(self, indexes: dict[int, int], timeout: float) -> None:
        """Wait up to `timeout` for worker messages and act on each."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        while readable:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            sender = next(
                (
                    struct.unpack("iII", payload)[0]
                    for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            index = indexes.get(sender) if sender is not None else None
            if index is not None and b"READY=1" in data.split(b"\n"):
                self.worker_ready(index)

    def worker_ready(self, index: int) -> None:
        self.started.add(index)
        if not self.ready_sent and len(self.started) == self.workers:
            self.ready_sent = True
            systemd_notify.notify(
                "READY=1", f"STATUS={self.workers} workers listening", environ=self.systemd
            )
        elif self.reload_pending:
            self.reload_pending.discard(index)
            if not self.reload_pending:
                systemd_notify.notify("READY=1", "STATUS=reloaded", environ=self.systemd)

    def reloading(self) -> None:
        self.reload_pending = set(range(self.workers))
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd_notify.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_us}", environ=self.systemd)

    def stopping(self) -> None:
        systemd_notify.notify("STOPPING=1", "STATUS=draining", environ=self.systemd)

    def close(self) -> None:
        self.sock.close()
