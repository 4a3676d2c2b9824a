"""Rule-based fuzzing of the LoginGuard: whatever sequence of failures, successes, unlocks
and clock steps, an address that logged in to an account is never locked out of it by
failures from other addresses, and every table stays bounded."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xmpp_server.login_guard import KNOWN_PER_ACCOUNT, GuardLimits, LoginGuard

ADDRESSES = st.sampled_from(
    ["192.0.2.1", "192.0.2.2", "198.51.100.7", "2001:db8::1", "2001:db8::2", "2001:db8:1::1"]
)
ACCOUNTS = st.sampled_from(["alice@d", "bob@d", "carol@d", "nobody@d"])
MAX_KEYS = 8


class GuardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.limits = GuardLimits(
            per_pair=2, per_address=3, per_account=3, window=10, lockout=5, max_keys=MAX_KEYS
        )
        self.guard = LoginGuard(self.limits)
        self.now = 0.0
        # (address, account) -> failures from that same address since its last success.
        self.own_failures: dict[tuple[str, str], int] = {}

    @rule(dt=st.floats(min_value=0, max_value=20, allow_nan=False))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(address=ADDRESSES, account=st.one_of(st.none(), ACCOUNTS))
    def fail(self, address: str, account: str | None) -> None:
        self.guard.failure(address, account, self.now)
        if account is not None:
            key = (address, account)
            self.own_failures[key] = self.own_failures.get(key, 0) + 1

    @rule(address=ADDRESSES, account=ACCOUNTS)
    def succeed(self, address: str, account: str) -> None:
        self.guard.success(address, account)
        self.own_failures[(address, account)] = 0
        assert self.guard.known(address, account)

    @rule(account=ACCOUNTS, address=st.one_of(st.none(), ADDRESSES))
    def unlock(self, account: str, address: str | None) -> None:
        self.guard.unlock(account, address)
        for key in list(self.own_failures):
            if key[1] == account and address in (None, key[0]):
                self.own_failures[key] = 0
        if address is None:
            for other in ["192.0.2.1", "192.0.2.2", "198.51.100.7", "2001:db8::1"]:
                assert self.guard.blocked(other, account, self.now) == 0.0 or (
                    # only an address's own spraying can still hold it back
                    not self.guard.known(other, account)
                )

    @precondition(lambda self: self.own_failures)
    @rule(data=st.data())
    def known_never_locked_by_others(self, data: st.DataObject) -> None:
        address, account = data.draw(st.sampled_from(sorted(self.own_failures)))
        if not self.guard.known(address, account):
            return
        if self.own_failures[(address, account)] < self.limits.per_pair:
            assert self.guard.blocked(address, account, self.now) == 0.0

    @invariant()
    def bounded(self) -> None:
        assert len(self.guard) <= 3 * MAX_KEYS + MAX_KEYS * KNOWN_PER_ACCOUNT

    @invariant()
    def waits_are_sane(self) -> None:
        for address in ("192.0.2.1", "2001:db8::2"):
            for account in ("alice@d", "bob@d"):
                wait = self.guard.blocked(address, account, self.now)
                assert 0.0 <= wait <= self.limits.lockout + 1e-9


TestLoginGuard = GuardMachine.TestCase
