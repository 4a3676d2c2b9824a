"""Login-failure throttling, so password guessing costs the guesser time."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    # Only the newest ``max_failures`` timestamps can ever matter, so the deque is capped.
    failures: deque[float]
    locked_until: float = field(default=0.0)


class FailureThrottle:
    """Failed logins per key (an IP or an account) within a sliding window.

    Sans-IO: ``now`` is passed in, so tests need no clock and the caller picks one.

    ``max_failures`` failures within ``window`` seconds lock the key for
    ``lockout`` seconds. A failure reported while locked restarts the lockout:
    whoever keeps guessing through it stays shut out. At most ``max_keys`` keys
    are tracked; beyond that the least recently failing key is forgotten, so a
    flood of distinct keys costs bounded memory (at the price of forgetting the
    oldest, not the most dangerous, offenders).

    Use a monotonic clock for ``now``. Note that ``success`` on a shared key (an
    IP behind NAT) also forgives the other users' failures; pick keys accordingly.
    """

    def __init__(
        self, max_failures: int, window: float, lockout: float, max_keys: int = 100_000
    ) -> None:
        if max_failures < 1 or window <= 0 or lockout < 0 or max_keys < 1:
            raise ValueError(
                "throttle needs max_failures >= 1, window > 0, lockout >= 0, max_keys >= 1"
            )
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def blocked(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0.0 if allowed."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        if entry.locked_until > now:
            return entry.locked_until - now
        if self._stale(entry, now):
            del self._entries[key]
        return 0.0

    def failure(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(deque(maxlen=self.max_failures))
        else:
            self._entries.move_to_end(key)
        if entry.locked_until > now:
            entry.locked_until = now + self.lockout
        else:
            entry.failures.append(now)
            while entry.failures and entry.failures[0] <= now - self.window:
                entry.failures.popleft()
            if len(entry.failures) >= self.max_failures:
                entry.failures.clear()
                entry.locked_until = now + self.lockout
        self._evict(now)

    def success(self, key: str) -> None:
        self._entries.pop(key, None)

    def keys(self) -> list[str]:
        """The keys tracked now (a copy, so the caller may forgive while iterating)."""
        return list(self._entries)

    def _stale(self, entry: _Entry, now: float) -> bool:
        return entry.locked_until <= now and (
            not entry.failures or entry.failures[-1] <= now - self.window
        )

    def _evict(self, now: float) -> None:
        # Drop expired entries from the old end first (cheap: stops at the first live
        # one), then the oldest live ones if still over the cap.
        while self._entries:
            oldest_key = next(iter(self._entries))
            if not self._stale(self._entries[oldest_key], now):
                break
            del self._entries[oldest_key]
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
