"""What the request path reads of state that other worker processes share with this one.

Protocols only: cluster/ implements them over memory the supervisor maps into every worker
(cluster.shared_table), and binds them to the runtime's parts. With one worker nothing is
bound, and each check costs one attribute test.

A shared count is one cell per worker: each worker writes only its own cell (a plain store
into shared memory, no lock, no system call) and reads the others' cells when it decides.
"""

from __future__ import annotations

from typing import Protocol


class SharedCount(Protocol):
    """This worker's cell of a gateway-wide count (in-flight requests, per backend or all)."""

    def publish(self, value: int) -> None:
        """Write this worker's current value."""

    def elsewhere(self) -> int:
        """The sum of every other live worker's value, read now."""
