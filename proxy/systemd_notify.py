"""systemd's readiness protocol (sd_notify(3)): one datagram of `KEY=value` lines to the socket
named by $NOTIFY_SOCKET.

Written out here instead of depending on python-systemd (a C extension) or sdnotify: the whole
protocol the unit needs is these lines. Without $NOTIFY_SOCKET (not started by systemd with
Type=notify) every call does nothing, so the gateway runs the same everywhere else.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("request_router")


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `assignments` (e.g. "READY=1") as one message; True if it was sent. A failure is
    logged, never raised: the service manager's bookkeeping must not stop the gateway."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):  # unset, or a transport we do not speak (vsock:)
        return False
    if address.startswith("@"):  # Linux abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("could not notify the service manager (%s): %s", assignments[0], exc)
        return False
    return True


def ready(status: str) -> bool:
    """Listening, config loaded: `systemctl start` returns and dependent units start."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """A reload has begun; `ready()` ends it. MONOTONIC_USEC is required with RELOADING=1 by
    systemd >= 253 (Type=notify-reload) and ignored by older versions."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def stopping(status: str) -> bool:
    """Draining: systemd shows the unit as deactivating while in-flight requests finish."""
    return notify("STOPPING=1", f"STATUS={status}")
