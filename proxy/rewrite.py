"""Writing the serving model's name into a request body.

`"model": "auto"` (or no model) lets the gateway choose, and a fallback serves another model
than the one asked for: the backend must get its own name in the body. The body is serialised
once, with a placeholder where the name goes, and each attempt splices the name in: no
re-parse and no re-serialisation per attempt. A body orjson can read but not write (it reads
1024 levels of nesting and writes 254) is refused with 400 when the template is built, which
for "auto" is before anything is taken.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from proxy.errors import InvalidRequest

# Random per process: a client cannot put it in a body on purpose.
PLACEHOLDER = "request-router:model:" + os.urandom(8).hex()
_QUOTED_PLACEHOLDER = orjson.dumps(PLACEHOLDER)


def serialise(document: dict[str, Any]) -> bytes:
    """The document as JSON, or 400 naming why it cannot be forwarded."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(
            f"request body cannot be forwarded: {exc}", code="invalid_json"
        ) from None


class ModelTemplate:
    """The body with a hole where the model's name goes."""

    __slots__ = ("prefix", "suffix")

    def __init__(self, document: dict[str, Any]) -> None:
        data = serialise({**document, "model": PLACEHOLDER})
        self.prefix, _, self.suffix = data.partition(_QUOTED_PLACEHOLDER)

    def with_model(self, model: str | None) -> bytes:
        return b"".join((self.prefix, orjson.dumps(model), self.suffix))
