"""Passive health: outcomes of real traffic.

Failures seen on the request path (connect errors, timeouts, 5xx, truncated bodies) are
recorded on the backend's circuit breaker by the request path itself (proxy.handler), so this
module holds only the rule for what counts as a failure, shared by every caller.
"""

from __future__ import annotations


def is_failure_status(status: int) -> bool:
    """5xx says the backend failed; a 4xx is the client's doing and says nothing of health."""
    return status >= 500
