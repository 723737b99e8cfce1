"""Type aliases shared by handlers and middlewares (aiohttp's own, so the two always agree)."""

from aiohttp.typedefs import Handler, Middleware

__all__ = ["Handler", "Middleware"]
