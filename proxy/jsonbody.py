"""JSON bodies that may be kept: orjson's output, right-sized.

orjson over-allocates the bytes object it returns (at least 4 KiB) and never gives the slack
back (ijl/orjson#483). A response body outlives its request: aiohttp keeps a connection's
last response until the next request on it, so every idle keep-alive connection held 4 KiB
of slack behind a 50-byte JSON answer (about 40% of its cost). Joining with b"" copies the
bytes into an object of their own size, for 0.06 µs.
"""

from __future__ import annotations

from typing import Any

import orjson


def json_bytes(data: Any) -> bytes:
    return b"".join((orjson.dumps(data), b""))
