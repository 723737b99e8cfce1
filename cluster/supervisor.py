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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from cluster import shared_table

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

    children = {index: start(index) for index in range(workers)}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
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
            time.sleep(0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        table.close()
        shutil.rmtree(run_dir, ignore_errors=True)
