"""STUN errors that carry their wire code: raised by handlers, answered in one place."""

from __future__ import annotations

REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


class StunError(Exception):
    """Ends a request with an ERROR-CODE response; ``reason`` defaults to the RFC's phrase."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason if reason is not None else REASONS[code]
        super().__init__(f"{code} {self.reason}")
