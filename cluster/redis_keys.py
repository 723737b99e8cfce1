"""The names every member of a gateway uses in Redis: its keys and channel, under
`redis.key_prefix` (gateways with another prefix on the same Redis are another gateway)."""

from __future__ import annotations


class Keys:
    """Every key and channel, under the configured prefix."""

    def __init__(self, prefix: str) -> None:
        self.members = f"{prefix}:members"
        self.member_info = f"{prefix}:member-info"
        self.spend = f"{prefix}:spend"
        self.hints = f"{prefix}:hints"  # fields open:<backend>, cooldown:<backend>
        self.record = f"{prefix}:overrides"
        self.channel = f"{prefix}:overrides"
        self._prefix = prefix

    def limit(self, name: str) -> str:
        return f"{self._prefix}:limit:{name}"
