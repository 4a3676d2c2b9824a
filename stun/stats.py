"""Counters for the STUN/TURN server, read by logs now and by a metrics exporter later."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StunStats:
    requests: Counter[str] = field(default_factory=Counter)
    """Requests by method name ("BINDING", "ALLOCATE", ...), counted once parsed."""
    errors: Counter[int] = field(default_factory=Counter)
    """Error responses sent, by code."""
    dropped: int = 0
    """Packets that could not be parsed, or came from a client that has no business sending them."""
    rate_limited: int = 0
    allocations_active: int = 0
    allocations_total: int = 0
    relayed_packets: int = 0
    """Datagrams relayed in either direction (client to peer and peer to client)."""
    relayed_bytes: int = 0
    """Payload bytes relayed in either direction, without STUN or ChannelData headers."""

    def relayed(self, size: int) -> None:
        self.relayed_packets += 1
        self.relayed_bytes += size

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy, for logs and ``natterctl``."""
        return {
            "requests": dict(self.requests),
            "errors": {str(code): count for code, count in sorted(self.errors.items())},
            "dropped": self.dropped,
            "rate_limited": self.rate_limited,
            "allocations_active": self.allocations_active,
            "allocations_total": self.allocations_total,
            "relayed_packets": self.relayed_packets,
            "relayed_bytes": self.relayed_bytes,
        }
