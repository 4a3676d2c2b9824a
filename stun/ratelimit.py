"""Per-source token buckets: ``rate`` requests a second, ``burst`` at once (sans-IO)."""

from __future__ import annotations

MAX_SOURCES = 65536


class RateLimiter:
    """Decides whether a source may send another request; the caller drops it otherwise.

    A spoofing attacker can invent sources faster than buckets refill, so the table is
    bounded: once full, unknown sources share a single bucket until ``prune`` frees room.
    """

    def __init__(self, rate: float, burst: int, max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[str | None, tuple[float, float]] = {}  # source -> (tokens, at)

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        key: str | None = source
        if key not in self._buckets and len(self._buckets) >= self.max_sources:
            key = None
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled: they behave exactly like new ones."""
        if self.rate <= 0:
            return
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
