"""An in-memory network and a small TURN client for driving the sans-IO cores."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from stun.auth import LongTermAuth, Nonces
from stun.credentials import turn_credentials
from stun.message import Class, Message, Method, long_term_key, parse_message
from stun.network import Address, Endpoint
from stun.policy import PeerPolicy
from stun.ratelimit import RateLimiter
from stun.server import Alternate, StunServer
from stun.stats import StunStats
from stun.turn import RelayHost, TurnServer, TurnSettings

SECRET = "s3cret"
REALM = "example.org"
NOW = 1_700_000_000.0
SERVER = ("192.0.2.1", 3478)
CLIENT = ("203.0.113.10", 40000)
UDP = Endpoint("udp", CLIENT, SERVER)
TCP = Endpoint("tcp", CLIENT, SERVER)
PEER = ("45.67.89.10", 5000)  # public: documentation ranges are special-purpose, so denied


@dataclass
class FakeNetwork:
    """Records what the cores send; relay ports listed in ``busy`` cannot be bound."""

    sent: list[tuple[Endpoint, bytes, Address | None]] = field(default_factory=list)
    to_peers: list[tuple[Address, Address, bytes]] = field(default_factory=list)
    relays: dict[Address, bool] = field(default_factory=dict)  # address -> dont_fragment
    busy: set[Address] = field(default_factory=set)
    closed: list[Address] = field(default_factory=list)

    def send(self, endpoint: Endpoint, data: bytes, source: Address | None = None) -> None:
        self.sent.append((endpoint, data, source))

    def open_relay(self, address: Address, dont_fragment: bool) -> bool:
        if address in self.busy or address in self.relays:
            return False
        self.relays[address] = dont_fragment
        return True

    def close_relay(self, address: Address) -> None:
        del self.relays[address]
        self.closed.append(address)

    def send_from_relay(self, relay: Address, peer: Address, data: bytes) -> None:
        self.to_peers.append((relay, peer, data))


def make_server(
    *,
    turn: bool = True,
    allowed: tuple[str, ...] = (),
    alternate: Alternate | None = None,
    rate: float = 0,
    burst: int = 10,
    relay_hosts: dict[int, RelayHost] | None = None,
    **settings: Any,
) -> tuple[StunServer, FakeNetwork]:
    network = FakeNetwork()
    stats = StunStats()
    turn_server = auth = None
    if turn:
        hosts = relay_hosts if relay_hosts is not None else {4: RelayHost("0.0.0.0", SERVER[0])}
        turn_settings = TurnSettings(relay_hosts=hosts, **settings)
        turn_server = TurnServer(
            turn_settings, network, PeerPolicy(allowed), stats, random.Random(1)
        )
        auth = LongTermAuth(REALM, SECRET, Nonces(b"k" * 32))
    server = StunServer(
        network,
        stats,
        RateLimiter(rate, burst),
        turn=turn_server,
        auth=auth,
        alternate=alternate,
    )
    return server, network


class Client:
    """Speaks to a StunServer like a TURN client: learns the nonce, signs its requests."""

    def __init__(
        self,
        server: StunServer,
        network: FakeNetwork,
        endpoint: Endpoint = UDP,
        user: str = "alice@example.org",
        ttl: int = 3600,
    ) -> None:
        self.server = server
        self.network = network
        self.endpoint = endpoint
        self.username, self.password = turn_credentials(SECRET, user, ttl, NOW)
        self.nonce: bytes | None = None
        self.now = NOW

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, REALM, self.password)

    def send(self, message: Message | bytes) -> Message | None:
        """Deliver a message; the response it caused, if any."""
        before = len(self.network.sent)
        self.server.receive(bytes(message), self.endpoint, self.now)
        if len(self.network.sent) == before:
            return None
        assert len(self.network.sent) == before + 1
        return parse_message(self.network.sent[-1][1], classic=True)

    def request(
        self,
        method: Method,
        attributes: dict[str, Any] | None = None,
        *,
        sign: bool = True,
        transaction_id: bytes | None = None,
    ) -> Message:
        """An authenticated request, after a first unauthenticated one to learn the nonce."""
        if self.nonce is None:
            challenge = self.send(Message(Method.ALLOCATE, Class.REQUEST))
            assert challenge is not None and challenge.error_code == 401
            self.nonce = challenge.attributes["NONCE"]
        message = Message(method, Class.REQUEST, attributes=dict(attributes or {}))
        if transaction_id is not None:
            message.transaction_id = transaction_id
        if sign:
            message.attributes.update(
                {"USERNAME": self.username, "REALM": REALM, "NONCE": self.nonce}
            )
            message.add_message_integrity(self.key)
        response = self.send(message)
        assert response is not None
        assert response.transaction_id == message.transaction_id
        return response

    def allocate(self, **attributes: Any) -> Message:
        return self.request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17, **attributes})
