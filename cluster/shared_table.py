"""The table the workers of one host share: one row per worker, each written only by its worker.

The supervisor creates it as a file in its private run directory; every worker maps it
(`mmap`, MAP_SHARED). That is what `multiprocessing.shared_memory` does, without its resource
tracker, which on Python 3.11 unlinks the segment when any attached process exits.

Layout (little-endian 8-byte cells, read as int64 or float64 views of the same memory):
- header: magic, rows, spend base (what accounting had recorded when the gateway started);
- key names: columns are named ("backend:<name>", "limit:global", ...) so workers agree on
  them whatever order their configs list things in; a worker adds a name under a file lock
  (off the request path: at start and on reload);
- per row: the worker's pid, heartbeat (wall clock), config generation, in-flight total,
  spend and the budget period it is for (proxy.budget_period), then per key: a count
  (in-flight requests, or tokens granted), a breaker's open-until and a 429
  cool-down-until (monotonic clock: the same clock in every process of one host), then the
  tokens granted per client, by a hash of the client key.

Writes are single 8-byte stores of the worker's own cells, so readers see old or new values,
never torn ones; nobody writes another worker's row except the supervisor, which clears the
in-flight counts of a worker that died (it has nothing in flight any more).
"""

from __future__ import annotations

import mmap
import os
import zlib
from pathlib import Path

from cluster.files import locked

MAGIC = 0x52525348_41524501  # "RRSHARE" + layout version 1
MAX_KEYS = 256
KEY_NAME_BYTES = 64
CLIENT_SLOTS = 4096

HEADER_CELLS = 8
# Row head cells
PID, HEARTBEAT, GENERATION, IN_FLIGHT, SPEND, _UNUSED, SPEND_PERIOD = range(7)
ROW_HEAD_CELLS = 8
# Per-key cells
COUNT, OPEN_UNTIL, COOLDOWN_UNTIL = range(3)
KEY_CELLS = 4
ROW_CELLS = ROW_HEAD_CELLS + MAX_KEYS * KEY_CELLS + CLIENT_SLOTS
# Header cells
H_MAGIC, H_ROWS, H_SPEND_BASE, H_SPEND_BASE_SET, H_SPEND_BASE_PERIOD = range(5)

NAMES_OFFSET = HEADER_CELLS * 8
ROWS_OFFSET = NAMES_OFFSET + MAX_KEYS * KEY_NAME_BYTES
TABLE_FILE = "shared.table"
LOCK_FILE = "shared.lock"


class TableFull(Exception):
    """More distinct keys than the table has columns for."""


def table_size(rows: int) -> int:
    return ROWS_OFFSET + rows * ROW_CELLS * 8


def create(run_dir: str, rows: int) -> Path:
    """The supervisor's part: a zeroed table for `rows` workers."""
    path = Path(run_dir) / TABLE_FILE
    with open(path, "wb") as file:
        file.truncate(table_size(rows))
    table = SharedTable(run_dir)
    table.ints[H_MAGIC] = MAGIC
    table.ints[H_ROWS] = rows
    table.close()
    return path


def client_slot(key: str) -> int:
    """Where a client's granted tokens are counted. Two clients whose keys share a slot share
    one gateway-wide count (each worker takes both clients' grants off the bucket of whichever
    of them it serves): with 100 clients active at once, about 2 in 100 share a slot."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % CLIENT_SLOTS


class SharedTable:
    """One worker's (or the supervisor's) mapping of the table."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self._file = open(self.run_dir / TABLE_FILE, "r+b")  # noqa: SIM115 (kept for mmap)
        self._map = mmap.mmap(self._file.fileno(), 0)
        self.ints = memoryview(self._map).cast("q")
        self.floats = memoryview(self._map).cast("d")
        if self.ints[H_MAGIC] not in (0, MAGIC):
            raise ValueError(f"{self._file.name} is not a request-router table")
        self._columns: dict[str, int] = {}

    @property
    def rows(self) -> int:
        return self.ints[H_ROWS]

    def row_base(self, row: int) -> int:
        """The cell index where `row` starts."""
        return (ROWS_OFFSET // 8) + row * ROW_CELLS

    def key_cell(self, row: int, column: int, field: int) -> int:
        return self.row_base(row) + ROW_HEAD_CELLS + column * KEY_CELLS + field

    def client_cell(self, row: int, slot: int) -> int:
        return self.row_base(row) + ROW_HEAD_CELLS + MAX_KEYS * KEY_CELLS + slot

    def column(self, key: str) -> int:
        """The column of `key`, added under the lock when no worker has used it yet."""
        column = self._columns.get(key)
        if column is not None:
            return column
        encoded = key.encode("utf-8", "surrogateescape")[:KEY_NAME_BYTES]
        padded = encoded.ljust(KEY_NAME_BYTES, b"\0")
        with locked(self.run_dir / LOCK_FILE):
            for index in range(MAX_KEYS):
                start = NAMES_OFFSET + index * KEY_NAME_BYTES
                name = self._map[start : start + KEY_NAME_BYTES]
                if name == padded:
                    break
                if name[0] == 0:
                    self._map[start : start + KEY_NAME_BYTES] = padded
                    break
            else:
                raise TableFull(f"more than {MAX_KEYS} shared keys (backends and limits)")
        self._columns[key] = index
        return index

    def keys(self) -> dict[str, int]:
        """Every named column, for reports."""
        found = {}
        for index in range(MAX_KEYS):
            start = NAMES_OFFSET + index * KEY_NAME_BYTES
            raw = bytes(self._map[start : start + KEY_NAME_BYTES]).rstrip(b"\0")
            if not raw:
                break
            found[raw.decode("utf-8", "surrogateescape")] = index
        return found

    def spend_base(self, read: float, period: int) -> float:
        """What accounting had recorded in budget period `period` before the gateway started:
        the first worker to ask sets it from its own reading; later ones (and restarted ones)
        get that same figure, so spend that workers flushed since is not counted twice. In a
        later period it is 0: the workers' rows hold all of that period's spend."""
        with locked(self.run_dir / LOCK_FILE):
            if not self.ints[H_SPEND_BASE_SET]:
                self.floats[H_SPEND_BASE] = read
                self.ints[H_SPEND_BASE_PERIOD] = period
                self.ints[H_SPEND_BASE_SET] = 1
            if self.ints[H_SPEND_BASE_PERIOD] != period:
                return 0.0
            return self.floats[H_SPEND_BASE]

    def clear_in_flight(self, row: int) -> None:
        """The supervisor's part when a worker died: it has nothing in flight any more."""
        ints = self.ints
        ints[self.row_base(row) + IN_FLIGHT] = 0
        for key, column in self.keys().items():
            if key.startswith("backend:"):
                ints[self.key_cell(row, column, COUNT)] = 0
        ints[self.row_base(row) + PID] = 0

    def close(self) -> None:
        self.ints.release()
        self.floats.release()
        self._map.close()
        self._file.close()


def remove(run_dir: str) -> None:
    for name in (TABLE_FILE, LOCK_FILE):
        try:
            os.unlink(Path(run_dir) / name)
        except FileNotFoundError:
            pass
