"""Runtime overrides, kept where a restarted worker (or a host joining) finds them.

What the admin API changed at runtime (the strategy, of the router and of each pool) and the
generation: a number that grows with every change and reload the gateway applied. The record
is a small JSON file in the supervisor's run directory, replaced atomically and written
under a file lock; the Redis section (cluster.redis_sync) mirrors it between hosts.

Every worker applies a broadcast change itself, and each then offers the same new state: the
first one to write it bumps the generation, the others find it already recorded, so one
change is one generation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from balancers.registry import UnknownStrategyError
from cluster.files import locked, replace_atomically
from config.schema import Config
from proxy.router import Router
from proxy.upstream import ADMIN_STATES, READY

log = logging.getLogger("request_router.workers")

RECORD_FILE = "overrides.json"


@dataclass(frozen=True)
class OverrideRecord:
    generation: int
    strategy: str
    pools: dict[str, str] = field(default_factory=dict)
    config_digest: str = ""
    # backends an operator drained or put in maintenance (PUT .../backends/{name}/state)
    backends: dict[str, str] = field(default_factory=dict)

    def state(self) -> tuple[str, dict[str, str], str, dict[str, str]]:
        return (self.strategy, self.pools, self.config_digest, self.backends)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "strategy": self.strategy,
            "pools": self.pools,
            "config_digest": self.config_digest,
            "backends": self.backends,
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> OverrideRecord:
        return cls(
            int(document["generation"]),
            str(document["strategy"]),
            {str(k): str(v) for k, v in dict(document.get("pools", {})).items()},
            str(document.get("config_digest", "")),
            {str(k): str(v) for k, v in dict(document.get("backends", {})).items()},
        )


def config_digest(config: Config) -> str:
    """Which configuration is loaded, so a reload counts as a change even when it kept the
    strategies (dataclass reprs are deterministic)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


def current_state(router: Router, config: Config) -> OverrideRecord:
    pools = {name: pool.strategy for name, pool in router.pools.items()}
    backends = {u.name: u.admin_state for u in router.upstreams if u.admin_state != READY}
    return OverrideRecord(0, router.strategy, pools, config_digest(config), backends)


def apply_overrides(router: Router, record: OverrideRecord) -> bool:
    """Set the record's strategies and backend admin states on `router`; pools and backends it
    does not have are ignored. True when anything changed."""
    changed = apply_backend_states(router, record)
    try:
        changed = router.use_strategies(record.strategy, record.pools) or changed
    except UnknownStrategyError as exc:  # a record from a newer gateway version
        log.warning("shared override not applied: %s", exc)
    return changed


def apply_backend_states(router: Router, record: OverrideRecord) -> bool:
    """Set each backend's admin state to the record's (ready when it names none)."""
    changed = False
    for upstream in router.upstreams:
        wanted = record.backends.get(upstream.name, READY)
        if wanted in ADMIN_STATES and upstream.set_admin_state(wanted):
            changed = True
    if changed:
        router.refresh_health()
    return changed


class OverrideStore:
    """Where this process's workers keep the record: `offer` a local change, `accept` one
    from elsewhere. Subclasses say where it lives and how writers are kept apart."""

    def __init__(self) -> None:
        # Called with each record this host writes (the Redis sync publishes it).
        self.on_write: list[Callable[[OverrideRecord], None]] = []

    def read(self) -> OverrideRecord | None:
        raise NotImplementedError

    def _write(self, record: OverrideRecord) -> None:
        raise NotImplementedError

    def _locked(self) -> AbstractContextManager[None]:
        return nullcontext()  # one process: the event loop serialises the changes

    @property
    def generation(self) -> int:
        record = self.read()
        return record.generation if record is not None else 0

    def offer(self, state: OverrideRecord) -> OverrideRecord:
        """Record `state` as the next generation unless it is what is recorded already."""
        with self._locked():
            recorded = self.read()
            if recorded is not None and recorded.state() == state.state():
                return recorded
            generation = (recorded.generation if recorded is not None else 0) + 1
            record = replace(state, generation=generation)
            self._write(record)
        for listener in self.on_write:
            listener(record)
        return record

    def accept(self, record: OverrideRecord) -> bool:
        """Store a record that came from elsewhere (another host), if it is newer."""
        with self._locked():
            recorded = self.read()
            if recorded is not None and recorded.generation >= record.generation:
                return False
            self._write(record)
            return True


class OverrideFile(OverrideStore):
    """The record on this host, shared by its workers: a file in the supervisor's run
    directory, replaced atomically, written under a file lock."""

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.path = Path(run_dir) / RECORD_FILE
        self._lock_path = Path(run_dir) / (RECORD_FILE + ".lock")
        self._seen: tuple[int, int, int] | None = None
        self._cached: OverrideRecord | None = None

    def read(self) -> OverrideRecord | None:
        """The record; parsed again only when the file was replaced (a new inode, size or
        time: writers replace it atomically), since every sync and report asks for it."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen == self._seen:
            return self._cached
        try:
            record = OverrideRecord.from_dict(orjson.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return None
        self._seen, self._cached = seen, record
        return record

    def _locked(self) -> AbstractContextManager[None]:
        return locked(self._lock_path)

    def _write(self, record: OverrideRecord) -> None:
        replace_atomically(self.path, orjson.dumps(record.as_dict()))


class OverrideMemory(OverrideStore):
    """The record of a gateway with one worker: nothing on this host outlives the process,
    so it lives in memory. It still counts generations, which the Redis sync compares with
    the other hosts' (and the cluster report shows)."""

    def __init__(self) -> None:
        super().__init__()
        self._record: OverrideRecord | None = None

    def read(self) -> OverrideRecord | None:
        return self._record

    def _write(self, record: OverrideRecord) -> None:
        self._record = record
