"""Append-only audit trail of admin changes: one JSON line per attempt, accepted or refused.

Admin changes are rare, so each line is written and flushed at once: the trail survives a
crash right after the change it records.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from telemetry.outcome import iso

log = logging.getLogger("request_router.audit")


def identity(request: web.Request) -> str:
    """Who made the change, without writing a secret down: a token's fingerprint, or the
    fact that it came from loopback without one."""
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        return f"token:{digest[:12]}"
    return "anonymous"


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries = 0

    def record(
        self,
        request: web.Request,
        action: str,
        *,
        old: Any = None,
        new: Any = None,
        accepted: bool,
        reason: str | None = None,
    ) -> None:
        entry = {
            "time": iso(time.time()),
            "action": action,
            "peer": request.remote,
            "identity": identity(request),
            "old": old,
            "new": new,
            "accepted": accepted,
            "reason": reason,
        }
        line = orjson.dumps(entry)
        self.entries += 1
        log.info("audit %s", line.decode())
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as file:
                file.write(line + b"\n")
