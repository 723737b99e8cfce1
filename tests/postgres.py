"""A throwaway PostgreSQL server on 127.0.0.1, from Debian's `postgresql` package."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from tests.process import free_port


def server_binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a DSN. PostgreSQL refuses to run as root, so as root it runs as `postgres`."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries are not installed")
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="router-pg-")
    data = os.path.join(base, "data")
    if as_user:
        entry = pwd.getpwnam("postgres")
        os.chown(base, entry.pw_uid, entry.pw_gid)
    port = free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    try:
        run(f"{binaries}/initdb", "-D", data, "-A", "trust", "-U", "router", "--no-sync")
        run(
            f"{binaries}/pg_ctl",
            "-D",
            data,
            "-l",
            os.path.join(base, "log"),
            "-w",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off",
        )
        try:
            yield f"postgresql://router@127.0.0.1:{port}/postgres"
        finally:
            run(f"{binaries}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)
