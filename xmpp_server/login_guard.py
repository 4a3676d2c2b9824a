"""Who may try a password now: login throttling that an attacker cannot turn against the owner.

A lock per account alone is a denial of service (anyone can lock anyone out by guessing), a
lock per address alone lets a botnet guess one password from a thousand addresses. So
failures are counted three ways, each with its own lock:

* per (address, account): the usual "five wrong passwords and wait";
* per address (an IPv6 address counts as its /64), across accounts: password spraying;
* per account, across addresses: distributed guessing.

An address that has authenticated an account before (an IPv6 address: any in its /64) is
*known* for it and is only ever held back by its own (address, account) failures: what other
addresses do can never lock the owner out of the networks it uses. Later a device token can
play the address's part.

Sans-IO (``now`` is passed in) and in memory: a restart forgets failures and known
addresses alike (so the first login after a restart is from an unknown address), which
errs on the owner's side. Every table is bounded.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from xmpp_server.throttle import FailureThrottle

KNOWN_PER_ACCOUNT = 16  # addresses remembered per account (most recent kept)


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """Failures within ``window`` seconds before a ``lockout`` (0 failures: never lock)."""

    per_pair: int = 5
    per_address: int = 20
    per_account: int = 20
    window: float = 60.0
    lockout: float = 60.0
    max_keys: int = 100_000


def network_of(address: str) -> str:
    """The unit an address-wide limit counts: the IPv4 address, or the IPv6 /64 (one host
    usually owns a whole /64 and can pick any address in it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _pair(address: str, account: str) -> str:
    return f"{account}\x00{address}"


def _throttle(failures: int, limits: GuardLimits) -> FailureThrottle | None:
    if failures <= 0:
        return None
    return FailureThrottle(failures, limits.window, limits.lockout, limits.max_keys)


class LoginGuard:
    """``blocked`` before checking a password, then ``failure`` or ``success``."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self._pairs = _throttle(limits.per_pair, limits)
        self._addresses = _throttle(limits.per_address, limits)
        self._accounts = _throttle(limits.per_account, limits)
        self._known: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def known(self, address: str, account: str) -> bool:
        """Whether ``address`` (its network: IPv6 privacy addresses change daily within
        the /64) has logged in to ``account`` before."""
        addresses = self._known.get(account)
        return addresses is not None and network_of(address) in addresses

    def blocked(self, address: str, account: str, now: float) -> float:
        """Seconds until ``address`` may try ``account``'s password again; 0.0 if now."""
        wait = 0.0
        if self._pairs is not None:
            wait = self._pairs.blocked(_pair(address, account), now)
        if self.known(address, account):
            return wait
        if self._addresses is not None:
            wait = max(wait, self._addresses.blocked(network_of(address), now))
        if self._accounts is not None:
            wait = max(wait, self._accounts.blocked(account, now))
        return wait

    def failure(self, address: str, account: str | None, now: float) -> None:
        """A wrong password (``account`` None: a name that is not even a valid JID)."""
        if self._addresses is not None:
            self._addresses.failure(network_of(address), now)
        if account is None:
            return
        if self._pairs is not None:
            self._pairs.failure(_pair(address, account), now)
        if self._accounts is not None:
            self._accounts.failure(account, now)

    def success(self, address: str, account: str) -> None:
        """``address`` proved it knows the password: it is known for ``account`` from now
        on. The account-wide count stays: the owner logging in must not hand an attacker
        elsewhere a fresh set of guesses."""
        if self._pairs is not None:
            self._pairs.success(_pair(address, account))
        addresses = self._known.get(account)
        if addresses is None:
            addresses = self._known[account] = OrderedDict()
        else:
            self._known.move_to_end(account)
        network = network_of(address)
        addresses[network] = None
        addresses.move_to_end(network)
        while len(addresses) > KNOWN_PER_ACCOUNT:
            addresses.popitem(last=False)
        while len(self._known) > self.limits.max_keys:
            self._known.popitem(last=False)

    def unlock(self, account: str, address: str | None = None) -> None:
        """The admin's ``natterctl user unlock``: forget the failures held against
        ``account`` (all of them, or only those of ``address`` and that address's own)."""
        if address is not None:
            if self._pairs is not None:
                self._pairs.success(_pair(address, account))
            if self._addresses is not None:
                self._addresses.success(network_of(address))
            return
        if self._accounts is not None:
            self._accounts.success(account)
        if self._pairs is not None:
            prefix = f"{account}\x00"
            for key in [k for k in self._pairs.keys() if k.startswith(prefix)]:
                self._pairs.success(key)

    def __len__(self) -> int:
        """Entries held, for memory-bound tests."""
        return sum(
            len(t) for t in (self._pairs, self._addresses, self._accounts) if t is not None
        ) + sum(len(a) for a in self._known.values())
