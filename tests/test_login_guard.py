"""LoginGuard: what others' failures can and cannot do to an account's owner."""

from __future__ import annotations

from xmpp_server.login_guard import GuardLimits, LoginGuard, network_of

OWNER, ATTACKER, OTHER = "192.0.2.1", "198.51.100.7", "203.0.113.9"
ALICE, BOB = "alice@example.org", "bob@example.org"
LIMITS = GuardLimits(per_pair=3, per_address=5, per_account=4, window=60, lockout=30)


def test_pair_lockout_then_release() -> None:
    guard = LoginGuard(LIMITS)
    for now in (0.0, 1.0, 2.0):
        assert guard.blocked(ATTACKER, ALICE, now) == 0.0
        guard.failure(ATTACKER, ALICE, now)
    assert guard.blocked(ATTACKER, ALICE, 2.0) == 30.0
    assert guard.blocked(ATTACKER, ALICE, 33.0) == 0.0


def test_others_failures_never_lock_a_known_address() -> None:
    guard = LoginGuard(LIMITS)
    guard.success(OWNER, ALICE)
    for i in range(100):
        guard.failure(f"10.0.0.{i}", ALICE, float(i))
        guard.failure(ATTACKER, ALICE, float(i))
    assert guard.blocked(OWNER, ALICE, 100.0) == 0.0
    # An address that never logged in to alice is held back by the account-wide lock.
    assert guard.blocked(OTHER, ALICE, 100.0) > 0
    # The known address is known for alice only.
    assert guard.blocked(ATTACKER, BOB, 100.0) > 0  # the attacker's own address-wide lock


def test_a_known_address_is_held_back_by_its_own_failures() -> None:
    guard = LoginGuard(LIMITS)
    guard.success(OWNER, ALICE)
    for now in (0.0, 1.0, 2.0):
        guard.failure(OWNER, ALICE, now)
    assert guard.blocked(OWNER, ALICE, 2.0) == 30.0


def test_success_forgives_the_pair_but_not_the_account() -> None:
    guard = LoginGuard(LIMITS)
    for now in (0.0, 1.0, 2.0, 3.0):
        guard.failure(f"10.0.0.{int(now)}", ALICE, now)
    assert guard.blocked(OTHER, ALICE, 3.0) == 30.0
    guard.success(OWNER, ALICE)
    assert guard.blocked(OWNER, ALICE, 3.0) == 0.0
    assert guard.blocked(OTHER, ALICE, 3.0) == 30.0


def test_password_spraying_locks_the_address() -> None:
    guard = LoginGuard(LIMITS)
    for i in range(5):
        guard.failure(ATTACKER, f"user{i}@example.org", float(i))
    assert guard.blocked(ATTACKER, "user9@example.org", 4.0) == 30.0
    assert guard.blocked(OTHER, "user9@example.org", 5.0) == 0.0
    guard.failure(ATTACKER, None, 6.0)  # an invalid name still counts for the address


def test_ipv6_addresses_count_per_64() -> None:
    assert network_of("2001:db8:1:2::1") == network_of("2001:db8:1:2:ffff::9")
    assert network_of("2001:db8:1:3::1") != network_of("2001:db8:1:2::1")
    assert network_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert network_of("?") == "?"
    guard = LoginGuard(LIMITS)
    for i in range(5):
        guard.failure(f"2001:db8:1:2::{i + 1:x}", f"user{i}@example.org", 0.0)
    assert guard.blocked("2001:db8:1:2::abcd", "new@example.org", 0.0) == 30.0


def test_unlock_everywhere_or_one_address() -> None:
    guard = LoginGuard(LIMITS)
    for now in range(4):
        guard.failure(ATTACKER, ALICE, float(now))
        guard.failure(OTHER, ALICE, float(now))
    assert guard.blocked(ATTACKER, ALICE, 4.0) > 0 and guard.blocked(OWNER, ALICE, 4.0) > 0
    guard.unlock(ALICE, ATTACKER)
    assert guard.blocked(ATTACKER, ALICE, 4.0) > 0  # the account-wide lock remains
    guard.unlock(ALICE)
    assert guard.blocked(OWNER, ALICE, 4.0) == 0.0
    assert guard.blocked(OTHER, ALICE, 4.0) == 0.0
    assert guard.blocked(ATTACKER, ALICE, 4.0) == 0.0


def test_zero_limits_never_lock() -> None:
    guard = LoginGuard(GuardLimits(per_pair=0, per_address=0, per_account=0))
    for now in range(100):
        guard.failure(ATTACKER, ALICE, float(now))
    assert guard.blocked(ATTACKER, ALICE, 100.0) == 0.0
    guard.unlock(ALICE)
    guard.unlock(ALICE, ATTACKER)


def test_memory_is_bounded() -> None:
    guard = LoginGuard(GuardLimits(max_keys=50))
    for i in range(2000):
        guard.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"u{i}@example.org", 0.0)
        guard.success(f"10.0.0.{i % 256}", f"u{i}@example.org")
    for i in range(100):
        guard.success(f"10.1.{i // 256}.{i % 256}", ALICE)
    assert len(guard) <= 50 * 3 + 50 * 16


def test_a_known_ipv6_network_stays_known_across_privacy_addresses() -> None:
    guard = LoginGuard(LIMITS)
    guard.success("2001:db8:1:2::1", ALICE)
    for i in range(50):
        guard.failure(f"2001:db8:9:{i:x}::1", ALICE, float(i))
    assert guard.blocked("2001:db8:1:2:abcd::7", ALICE, 50.0) == 0.0
    assert guard.blocked("2001:db8:1:3::1", ALICE, 50.0) > 0
