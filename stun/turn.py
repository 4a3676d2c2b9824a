"""TURN allocations (RFC 8656), sans-IO: the state and rules, with sockets behind ``Network``.

Requests arrive here already authenticated (``stun.auth``); this module decides what they
do to allocations, permissions and channels, and moves relayed data. Time is passed in.

Two deliberate choices:
- an active channel binding keeps its peer's permission alive. RFC 8656 gives permissions
  5 minutes and channels 10, but aioice (and so aiortc) refreshes channel bindings every
  500 s and never sends CreatePermission, so a strict server cuts its calls after 5 minutes;
- a failed ``sendto()`` towards one peer never tears an allocation down (a peer's host
  candidate may be unreachable; that is not the client's fault).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stun.errors import StunError
from stun.message import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    FAMILY_IPV4,
    FAMILY_IPV6,
    TRANSPORT_UDP,
    ChannelData,
    Class,
    Message,
    Method,
)
from stun.network import Address, Endpoint, Network
from stun.policy import PeerPolicy
from stun.stats import StunStats

log = logging.getLogger("natterd.turn")

PORT_ATTEMPTS = 64  # random relay ports tried before answering 508
MAX_PERMISSIONS = 256  # per allocation: bounds memory; ICE needs a handful
RESERVATION_LIFETIME = 30.0  # RFC 8656 section 7.2: an EVEN-PORT reservation's lifetime
VERSIONS = {FAMILY_IPV4: 4, FAMILY_IPV6: 6}


@dataclass(frozen=True)
class RelayHost:
    bind: str
    """Where relay sockets are bound (may be a wildcard address)."""
    advertised: str
    """What XOR-RELAYED-ADDRESS tells the client: a concrete address of this host."""


@dataclass(frozen=True)
class TurnSettings:
    relay_hosts: Mapping[int, RelayHost]
    """By IP version (4, 6): the families relays can be opened in."""
    min_port: int = 49152
    max_port: int = 65535
    max_allocations: int = 1000
    max_allocations_per_user: int = 10
    default_lifetime: int = 600
    max_lifetime: int = 3600
    permission_lifetime: int = 300
    channel_lifetime: int = 600


@dataclass(frozen=True)
class Relay:
    bind: Address
    advertised: Address


@dataclass
class Allocation:
    endpoint: Endpoint
    username: str
    user: str
    relays: dict[int, Relay]
    """By IP version: one relay, or two for a dual-stack allocation (RFC 8656 section 7.1)."""
    expires: float
    transaction_id: bytes
    """The Allocate that made it: a retransmission of it gets the same success again."""
    response: dict[str, Any]
    permissions: dict[str, float] = field(default_factory=dict)
    """Peer IP -> expiry."""
    channels: dict[int, tuple[Address, float]] = field(default_factory=dict)
    """Channel number -> (peer, expiry)."""
    peer_channels: dict[Address, int] = field(default_factory=dict)

    def permitted(self, host: str, now: float) -> bool:
        if self.permissions.get(host, 0.0) > now:
            return True
        return any(peer[0] == host and expires > now for peer, expires in self.channels.values())

    def channel_for(self, peer: Address, now: float) -> int | None:
        number = self.peer_channels.get(peer)
        if number is None or self.channels[number][1] <= now:
            return None
        return number


class TurnServer:
    """Allocations by client 5-tuple and by relay address, with quotas and peer policy."""

    def __init__(
        self,
        settings: TurnSettings,
        network: Network,
        policy: PeerPolicy,
        stats: StunStats,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.network = network
        self.policy = policy
        self.stats = stats
        self.rng = rng or random.SystemRandom()
        self.allocations: dict[Endpoint, Allocation] = {}
        self._by_relay: dict[Address, Allocation] = {}
        self._per_user: Counter[str] = Counter()
        self._reservations: dict[bytes, tuple[Relay, float]] = {}
        self._reserved: set[Address] = set()

    # -----------------------------------------------------------------------------------------
    # Requests (authenticated by the caller; StunError ends them with an error response)

    def handle_request(
        self, request: Message, endpoint: Endpoint, username: str, user: str, now: float
    ) -> dict[str, Any]:
        """Apply an Allocate, Refresh, CreatePermission or ChannelBind; return the success
        response's attributes."""
        method = request.message_method
        if method == Method.ALLOCATE:
            return self._allocate(request, endpoint, username, user, now)
        allocation = self._allocation(endpoint, now)
        if allocation is None:
            raise StunError(437, "Allocation does not exist")
        if allocation.username != username:
            raise StunError(441)
        if method == Method.REFRESH:
            return self._refresh(request, allocation, now)
        if method == Method.CREATE_PERMISSION:
            return self._create_permission(request, allocation, now)
        if method == Method.CHANNEL_BIND:
            return self._channel_bind(request, allocation, now)
        raise StunError(400, f"{method.name} is not a request")

    def _allocate(
        self, request: Message, endpoint: Endpoint, username: str, user: str, now: float
    ) -> dict[str, Any]:
        attributes = request.attributes
        existing = self._allocation(endpoint, now)
        if existing is not None:
            if existing.transaction_id == request.transaction_id and existing.username == username:
                return existing.response  # a retransmission (RFC 8656 section 7.2)
            raise StunError(437, "Allocation already exists")
        if "REQUESTED-TRANSPORT" not in attributes:
            raise StunError(400, "Missing REQUESTED-TRANSPORT attribute")
        if attributes["REQUESTED-TRANSPORT"] != TRANSPORT_UDP:
            raise StunError(442)
        token: bytes | None = attributes.get("RESERVATION-TOKEN")
        even_port = attributes.get("EVEN-PORT")
        requested = attributes.get("REQUESTED-ADDRESS-FAMILY")
        additional = attributes.get("ADDITIONAL-ADDRESS-FAMILY")
        if token is not None and (even_port is not None or requested is not None):
            raise StunError(400, "RESERVATION-TOKEN excludes EVEN-PORT and address families")
        if additional is not None:
            if requested is not None or even_port is not None or token is not None:
                raise StunError(400, "ADDITIONAL-ADDRESS-FAMILY excludes these attributes")
            if additional != FAMILY_IPV6:
                raise StunError(400, "ADDITIONAL-ADDRESS-FAMILY must be IPv6")
        version = 4 if requested is None else VERSIONS.get(requested)
        if version is None or (token is None and version not in self.settings.relay_hosts):
            raise StunError(440)

        if self.settings.max_allocations_per_user <= self._per_user[user]:
            raise StunError(486)
        if self.settings.max_allocations <= len(self.allocations):
            raise StunError(508)

        dont_fragment = "DONT-FRAGMENT" in attributes
        response: dict[str, Any] = {}
        relays: dict[int, Relay] = {}
        if token is not None:
            reserved = self._reservations.pop(token, None)
            if reserved is not None:
                self._reserved.discard(reserved[0].bind)
                if reserved[1] <= now:
                    self.network.close_relay(reserved[0].bind)
                    reserved = None
            if reserved is None:
                raise StunError(508, "Reservation token is unknown or expired")
            relays[_version(reserved[0].bind)] = reserved[0]
        else:
            reserve = bool(even_port)
            relay, reservation = self._open(version, even_port is not None, reserve, dont_fragment)
            relays[version] = relay
            if reservation is not None:
                token = self.rng.randbytes(8)
                self._reservations[token] = (reservation, now + RESERVATION_LIFETIME)
                self._reserved.add(reservation.bind)
                response["RESERVATION-TOKEN"] = token
        if additional is not None:
            try:
                relays[6] = self._open(6, False, False, dont_fragment)[0]
            except StunError as exc:
                # The IPv4 relay stands; the client learns why there is no IPv6 one.
                response["ADDRESS-ERROR-CODE"] = (FAMILY_IPV6, exc.code, exc.reason)

        lifetime = self._lifetime(attributes.get("LIFETIME"))
        response.update(
            {
                "XOR-RELAYED-ADDRESS": [relay.advertised for relay in relays.values()],
                "LIFETIME": lifetime,
                "XOR-MAPPED-ADDRESS": endpoint.client,
            }
        )
        allocation = Allocation(
            endpoint=endpoint,
            username=username,
            user=user,
            relays=relays,
            expires=now + lifetime,
            transaction_id=request.transaction_id,
            response=response,
        )
        self.allocations[endpoint] = allocation
        for relay in relays.values():
            self._by_relay[relay.bind] = allocation
        self._per_user[user] += 1
        self.stats.allocations_total += 1
        self.stats.allocations_active = len(self.allocations)
        log.info(
            "allocation %s for %s (%s) from %s/%s:%d",
            " ".join(f"{r.advertised[0]}:{r.advertised[1]}" for r in relays.values()),
            user,
            username,
            endpoint.transport,
            *endpoint.client,
        )
        return response

    def _open(
        self, version: int, even: bool, reserve: bool, dont_fragment: bool
    ) -> tuple[Relay, Relay | None]:
        """Bind a relay on a random port of the range (RFC 8656 recommends random ports);
        with ``reserve``, also hold the next (odd) port for a later allocation."""
        host = self.settings.relay_hosts.get(version)
        if host is None:
            raise StunError(440)
        low, high = self.settings.min_port, self.settings.max_port
        for _ in range(PORT_ATTEMPTS):
            port = self.rng.randint(low, high)
            if even:
                port -= port % 2
                if port < low or (reserve and port + 1 > high):
                    continue
            if not self._bind((host.bind, port), dont_fragment):
                continue
            relay = Relay((host.bind, port), (host.advertised, port))
            if not reserve:
                return relay, None
            if self._bind((host.bind, port + 1), dont_fragment):
                return relay, Relay((host.bind, port + 1), (host.advertised, port + 1))
            self.network.close_relay(relay.bind)
        raise StunError(508, "No relay port is free")

    def _bind(self, address: Address, dont_fragment: bool) -> bool:
        if address in self._by_relay or address in self._reserved:
            return False
        return self.network.open_relay(address, dont_fragment)

    def _lifetime(self, requested: int | None) -> int:
        """RFC 8656 section 7.2: the requested lifetime, capped, but never below the default."""
        if requested is None:
            return self.settings.default_lifetime
        return max(self.settings.default_lifetime, min(requested, self.settings.max_lifetime))

    def _refresh(self, request: Message, allocation: Allocation, now: float) -> dict[str, Any]:
        family = request.attributes.get("REQUESTED-ADDRESS-FAMILY")
        if family is not None and VERSIONS.get(family) not in allocation.relays:
            raise StunError(443)
        requested = request.attributes.get("LIFETIME")
        if requested == 0:
            self.delete(allocation, "deleted")
            return {"LIFETIME": 0}
        lifetime = self._lifetime(requested)
        allocation.expires = now + lifetime
        return {"LIFETIME": lifetime}

    def _peers(self, request: Message, allocation: Allocation) -> list[Address]:
        """The XOR-PEER-ADDRESSes, each in a relayed family and allowed by the policy."""
        peers: list[Address] = request.attributes.get("XOR-PEER-ADDRESS", [])
        if not peers:
            raise StunError(400, "Missing XOR-PEER-ADDRESS attribute")
        for peer in peers:
            if _version(peer) not in allocation.relays:
                raise StunError(443)
            if not self.policy.allows(peer[0]):
                raise StunError(403, "Peer address is not allowed")
        return peers

    def _create_permission(
        self, request: Message, allocation: Allocation, now: float
    ) -> dict[str, Any]:
        peers = self._peers(request, allocation)  # all or nothing (RFC 8656 section 9.2)
        hosts = {peer[0] for peer in peers}
        if len(hosts | set(allocation.permissions)) > MAX_PERMISSIONS:
            self._prune(allocation, now)
            if len(hosts | set(allocation.permissions)) > MAX_PERMISSIONS:
                raise StunError(508, "Too many permissions")
        for host in hosts:
            allocation.permissions[host] = now + self.settings.permission_lifetime
        return {}

    def _channel_bind(self, request: Message, allocation: Allocation, now: float) -> dict[str, Any]:
        number = request.attributes.get("CHANNEL-NUMBER")
        if number is None:
            raise StunError(400, "Missing CHANNEL-NUMBER attribute")
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise StunError(400, "Channel number is out of range")
        peers = self._peers(request, allocation)
        if len(peers) != 1:
            raise StunError(400, "ChannelBind takes one XOR-PEER-ADDRESS")
        peer = peers[0]
        bound = allocation.channels.get(number)
        if bound is not None and bound[0] != peer:
            raise StunError(400, "Channel is bound to another peer")
        if allocation.peer_channels.get(peer, number) != number:
            raise StunError(400, "Peer is bound to another channel")
        allocation.channels[number] = (peer, now + self.settings.channel_lifetime)
        allocation.peer_channels[peer] = number
        allocation.permissions[peer[0]] = now + self.settings.permission_lifetime
        return {}

    # -----------------------------------------------------------------------------------------
    # Data (never answered: problems mean the data is dropped)

    def handle_send(self, indication: Message, endpoint: Endpoint, now: float) -> None:
        allocation = self._allocation(endpoint, now)
        peers = indication.attributes.get("XOR-PEER-ADDRESS")
        data = indication.attributes.get("DATA")
        if allocation is None or not peers or data is None:
            return
        self._relay_to_peer(allocation, peers[0], data, now)

    def handle_channel_data(self, frame: ChannelData, endpoint: Endpoint, now: float) -> None:
        allocation = self._allocation(endpoint, now)
        if allocation is None:
            return
        bound = allocation.channels.get(frame.channel)
        if bound is None or bound[1] <= now:
            return
        self._relay_to_peer(allocation, bound[0], frame.data, now)

    def _relay_to_peer(
        self, allocation: Allocation, peer: Address, data: bytes, now: float
    ) -> None:
        relay = allocation.relays.get(_version(peer))
        if relay is None or not allocation.permitted(peer[0], now):
            return
        if not self.policy.allows(peer[0]):
            return
        self.network.send_from_relay(relay.bind, peer, data)
        self.stats.relayed(len(data))

    def receive_from_peer(self, relay: Address, data: bytes, peer: Address, now: float) -> None:
        """A datagram reached a relay socket: pass it on if the peer has a permission."""
        allocation = self._by_relay.get(relay)
        if allocation is None or allocation.expires <= now:
            return
        if not allocation.permitted(peer[0], now):
            return  # RFC 8656 section 9: no permission, no entry
        endpoint = allocation.endpoint
        number = allocation.channel_for(peer, now)
        if number is not None:
            frame = ChannelData(number, data)
            packet = frame.padded() if endpoint.stream else bytes(frame)
        else:
            indication = Message(Method.DATA, Class.INDICATION)
            indication.attributes["XOR-PEER-ADDRESS"] = [peer]
            indication.attributes["DATA"] = data
            packet = bytes(indication)
        self.network.send(endpoint, packet)
        self.stats.relayed(len(data))

    # -----------------------------------------------------------------------------------------
    # Lifetimes

    def _allocation(self, endpoint: Endpoint, now: float) -> Allocation | None:
        allocation = self.allocations.get(endpoint)
        if allocation is not None and allocation.expires <= now:
            self.delete(allocation, "expired")
            return None
        return allocation

    def has_allocation(self, endpoint: Endpoint) -> bool:
        return endpoint in self.allocations

    def delete(self, allocation: Allocation, why: str) -> None:
        if self.allocations.get(allocation.endpoint) is not allocation:
            return
        del self.allocations[allocation.endpoint]
        for relay in allocation.relays.values():
            del self._by_relay[relay.bind]
            self.network.close_relay(relay.bind)
        self._per_user[allocation.user] -= 1
        if self._per_user[allocation.user] <= 0:
            del self._per_user[allocation.user]
        self.stats.allocations_active = len(self.allocations)
        log.info(
            "allocation %s for %s %s",
            " ".join(f"{r.advertised[0]}:{r.advertised[1]}" for r in allocation.relays.values()),
            allocation.user,
            why,
        )

    def connection_lost(self, endpoint: Endpoint) -> None:
        """A TCP/TLS allocation lives as long as its connection (RFC 8656 section 3.1)."""
        allocation = self.allocations.get(endpoint)
        if allocation is not None:
            self.delete(allocation, "closed with its connection")

    def expire(self, now: float) -> None:
        """Drop expired allocations, permissions, channels and reservations."""
        for allocation in list(self.allocations.values()):
            if allocation.expires <= now:
                self.delete(allocation, "expired")
            else:
                self._prune(allocation, now)
        for token, (relay, expires) in list(self._reservations.items()):
            if expires <= now:
                del self._reservations[token]
                self._reserved.discard(relay.bind)
                self.network.close_relay(relay.bind)

    def _prune(self, allocation: Allocation, now: float) -> None:
        for host, expires in list(allocation.permissions.items()):
            if expires <= now:
                del allocation.permissions[host]
        for number, (peer, expires) in list(allocation.channels.items()):
            if expires <= now:
                del allocation.channels[number]
                del allocation.peer_channels[peer]

    def close(self) -> None:
        """Free every relay socket (the server is stopping)."""
        for allocation in list(self.allocations.values()):
            self.delete(allocation, "closed at shutdown")
        for relay, _ in self._reservations.values():
            self.network.close_relay(relay.bind)
        self._reservations.clear()
        self._reserved.clear()


def _version(address: Address) -> int:
    return 6 if ":" in address[0] else 4
