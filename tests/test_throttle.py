"""Login-failure throttle: lockout, sliding window, bounded memory."""

from __future__ import annotations

import pytest

from xmpp_server.throttle import FailureThrottle


def test_locks_after_max_failures_then_releases() -> None:
    t = FailureThrottle(max_failures=3, window=60, lockout=30)
    for now in (0.0, 1.0):
        t.failure("1.2.3.4", now)
        assert t.blocked("1.2.3.4", now) == 0.0
    t.failure("1.2.3.4", 2.0)
    assert t.blocked("1.2.3.4", 2.0) == 30.0
    assert t.blocked("1.2.3.4", 22.0) == 10.0
    assert t.blocked("other", 22.0) == 0.0
    assert t.blocked("1.2.3.4", 32.0) == 0.0
    # After the lockout the key starts afresh.
    t.failure("1.2.3.4", 33.0)
    assert t.blocked("1.2.3.4", 33.0) == 0.0


def test_sliding_window() -> None:
    t = FailureThrottle(max_failures=3, window=10, lockout=100)
    for now in (0.0, 6.0, 12.0, 18.0, 24.0):  # never three within 10 s
        t.failure("k", now)
        assert t.blocked("k", now) == 0.0
    t.failure("k", 25.0)
    t.failure("k", 26.0)
    assert t.blocked("k", 26.0) == 100.0


def test_failure_while_locked_restarts_lockout() -> None:
    t = FailureThrottle(max_failures=1, window=10, lockout=30)
    t.failure("k", 0.0)
    t.failure("k", 20.0)
    assert t.blocked("k", 20.0) == 30.0


def test_success_forgives() -> None:
    t = FailureThrottle(max_failures=2, window=60, lockout=30)
    t.failure("acct", 0.0)
    t.success("acct")
    t.failure("acct", 1.0)
    assert t.blocked("acct", 1.0) == 0.0
    t.failure("acct", 2.0)
    assert t.blocked("acct", 2.0) == 30.0
    t.success("acct")
    assert t.blocked("acct", 2.0) == 0.0
    t.success("never-seen")


def test_memory_bounded_under_flood() -> None:
    t = FailureThrottle(max_failures=5, window=60, lockout=60, max_keys=100)
    t.failure("victim-guesser", 0.0)
    for i in range(10_000):
        t.failure(f"10.0.{i // 256}.{i % 256}", 1.0)
        assert len(t) <= 100
    assert len(t) == 100
    # The most recent keys are kept, the oldest are gone.
    for _ in range(4):
        t.failure("10.0.39.15", 2.0)
    assert t.blocked("10.0.39.15", 2.0) == 60.0
    assert "victim-guesser" not in t._entries


def test_per_key_memory_bounded() -> None:
    t = FailureThrottle(max_failures=3, window=1e9, lockout=0)
    for i in range(1000):
        t.failure("k", float(i))
    assert len(t._entries["k"].failures) <= 3


def test_expired_entries_are_pruned() -> None:
    t = FailureThrottle(max_failures=3, window=10, lockout=10)
    for i in range(50):
        t.failure(f"k{i}", 0.0)
    assert len(t) == 50
    t.failure("late", 100.0)
    assert len(t) == 1
    assert t.blocked("late", 200.0) == 0.0
    assert len(t) == 0


def test_blocked_does_not_track_unknown_keys() -> None:
    t = FailureThrottle(max_failures=3, window=10, lockout=10)
    for i in range(100):
        assert t.blocked(f"k{i}", 0.0) == 0.0
    assert len(t) == 0


@pytest.mark.parametrize(
    "args",
    [(0, 10.0, 10.0, 10), (3, 0.0, 10.0, 10), (3, 10.0, -1.0, 10), (3, 10.0, 10.0, 0)],
)
def test_rejects_nonsense_settings(args: tuple[int, float, float, int]) -> None:
    with pytest.raises(ValueError):
        FailureThrottle(*args)
