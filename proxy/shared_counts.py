"""What the request path reads of state that other worker processes share with this one.

Protocols only: cluster/ implements them over memory the supervisor maps into every worker
(cluster.shared_table), and binds them to the runtime's parts. With one worker nothing is
bound, and each check costs one attribute test.

A shared count is one cell per worker: each worker writes only its own cell (a plain store
into shared memory, no lock, no system call) and reads the others' cells when it decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the runtime is above this leaf; only its type is named here
    from proxy.runtime import Runtime


class SharedCount(Protocol):
    """This worker's cell of a gateway-wide count (in-flight requests, per backend or all)."""

    def publish(self, value: int) -> None:
        """Write this worker's current value."""

    def elsewhere(self) -> int:
        """The sum of every other live worker's value, read now."""


class Sharing(Protocol):
    """Binds a runtime's parts to the shared table; called for every runtime a reload builds,
    so backends that a reload adds are shared from their first request."""

    def bind(self, runtime: Runtime) -> None: ...
