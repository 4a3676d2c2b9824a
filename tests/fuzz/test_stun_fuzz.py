"""Fuzzing the STUN/TURN codec and server (Hypothesis; ``ci`` profile in ``make test``, the
long ``fuzz`` profile in ``make fuzz``).

* The codec: arbitrary and mutated bytes raise ``ValueError`` and nothing else; whatever
  parses re-encodes to a message that parses to the same values; every well-formed message
  round-trips, with MESSAGE-INTEGRITY and FINGERPRINT intact.
* The server: arbitrary packets, and a TURN client whose signed requests are mutated, never
  make it raise; it only ever answers with responses, errors, Data indications or ChannelData,
  at most one answer per request; and the relay never sends to a peer the policy refuses.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stun.framing import StreamFramer
from stun.message import (
    ATTRIBUTES,
    COOKIE,
    ChannelData,
    Class,
    Message,
    Method,
    is_channel_data,
    parse_channel_data,
    parse_message,
)
from stun.policy import PeerPolicy
from stun.turn import RelayHost
from tests.fuzz.stats import fuzz_budget
from tests.stun.fakes import NOW, PEER, TCP, UDP, Client, make_server

# Attribute type numbers we know, plus neighbours, so bodies reach the value parsers.
ATTRIBUTE_TYPES = st.sampled_from([a.type for a in ATTRIBUTES] + [0x0000, 0x7FFF, 0x8000, 0xFFFF])


@st.composite
def attribute(draw: st.DrawFn) -> bytes:
    value = draw(st.binary(max_size=40))
    declared = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFF)))
    return struct.pack("!HH", draw(ATTRIBUTE_TYPES), declared) + value + bytes(-len(value) % 4)


@st.composite
def stun_message(draw: st.DrawFn) -> bytes:
    """Mostly well-framed messages with random attributes, so the parser goes deep."""
    body = b"".join(draw(st.lists(attribute(), max_size=8)))
    message_type = draw(st.integers(0, 0x3FFF))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
    transaction_id = draw(st.binary(min_size=12, max_size=12))
    cookie = draw(st.one_of(st.just(COOKIE), st.integers(0, 0xFFFFFFFF)))
    return struct.pack("!HHI", message_type, length, cookie) + transaction_id + body


# -- well-formed values, attribute by attribute ------------------------------------------

ADDRESS = st.tuples(st.ip_addresses().map(str), st.integers(0, 0xFFFF))
TEXT = st.text(max_size=60)
U32 = st.integers(0, 0xFFFFFFFF)
ERROR = st.tuples(st.integers(300, 699), TEXT)
ALGORITHM = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12))

VALUES: dict[str, st.SearchStrategy[Any]] = {
    "MAPPED-ADDRESS": ADDRESS,
    "CHANGE-REQUEST": U32,
    "SOURCE-ADDRESS": ADDRESS,
    "CHANGED-ADDRESS": ADDRESS,
    "USERNAME": TEXT,
    "ERROR-CODE": ERROR,
    "UNKNOWN-ATTRIBUTES": st.lists(st.integers(0, 0xFFFF), max_size=6),
    "CHANNEL-NUMBER": st.integers(0, 0xFFFF),
    "LIFETIME": U32,
    "XOR-PEER-ADDRESS": st.lists(ADDRESS, min_size=1, max_size=3),
    "DATA": st.binary(max_size=100),
    "REALM": TEXT,
    "NONCE": st.binary(max_size=64),
    "XOR-RELAYED-ADDRESS": st.lists(ADDRESS, min_size=1, max_size=2),
    "REQUESTED-ADDRESS-FAMILY": st.integers(0, 255),
    "EVEN-PORT": st.booleans(),
    "REQUESTED-TRANSPORT": st.integers(0, 255),
    "DONT-FRAGMENT": st.none(),
    "PASSWORD-ALGORITHM": ALGORITHM,
    "USERHASH": st.binary(min_size=32, max_size=32),
    "XOR-MAPPED-ADDRESS": ADDRESS,
    "RESERVATION-TOKEN": st.binary(min_size=8, max_size=8),
    "PRIORITY": U32,
    "USE-CANDIDATE": st.none(),
    "ADDITIONAL-ADDRESS-FAMILY": st.integers(0, 255),
    "ADDRESS-ERROR-CODE": st.tuples(st.integers(0, 255), st.integers(300, 699), TEXT),
    "PASSWORD-ALGORITHMS": st.lists(ALGORITHM, max_size=3),
    "ICMP": st.tuples(st.integers(0, 255), st.integers(0, 255), U32),
    "SOFTWARE": TEXT,
    "ALTERNATE-SERVER": ADDRESS,
    "ICE-CONTROLLED": st.integers(0, 2**64 - 1),
    "ICE-CONTROLLING": st.integers(0, 2**64 - 1),
    "RESPONSE-ORIGIN": ADDRESS,
    "OTHER-ADDRESS": ADDRESS,
}
"""Every attribute but the integrity and FINGERPRINT ones, which the round trip adds."""


@st.composite
def message(draw: st.DrawFn) -> Message:
    names = draw(st.lists(st.sampled_from(sorted(VALUES)), unique=True, max_size=10))
    result = Message(
        draw(st.sampled_from(list(Method))),
        draw(st.sampled_from(list(Class))),
        draw(st.binary(min_size=12, max_size=12)),
    )
    for name in names:
        result.attributes[name] = draw(VALUES[name])
    return result


def test_every_attribute_has_a_value_strategy() -> None:
    integrity = {"MESSAGE-INTEGRITY", "MESSAGE-INTEGRITY-SHA256", "FINGERPRINT"}
    assert set(VALUES) == {a.name for a in ATTRIBUTES} - integrity


@given(message(), st.binary(min_size=1, max_size=32), st.booleans(), st.booleans())
def test_encode_decode_round_trip(
    original: Message, key: bytes, integrity: bool, fingerprint: bool
) -> None:
    if integrity:
        original.add_message_integrity(key)
        original.add_message_integrity_sha256(key)
    if fingerprint:
        original.add_fingerprint()
    data = bytes(original)
    parsed = parse_message(data)
    assert parsed == original
    assert bytes(parsed) == data
    if integrity:
        assert parsed.check_message_integrity(key)
        assert not parsed.check_message_integrity(key + b"x")


# -- arbitrary and mutated bytes ---------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with a few bytes flipped, inserted, deleted, or the end cut off."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _signed(original: Message) -> bytes:
    original.add_message_integrity(b"key")
    original.add_fingerprint()
    return bytes(original)


def parses_cleanly(data: bytes) -> None:
    """Only ValueError; what parses re-encodes (FINGERPRINT recomputed) to the same values."""
    for classic in (False, True):
        try:
            parsed = parse_message(data, classic=classic)
        except ValueError:
            continue
        parsed.attributes.pop("FINGERPRINT", None)
        try:
            encoded = bytes(parsed)
        except ValueError:
            assert parsed.classic  # XOR attributes need the cookie's 12-byte transaction ID
            continue
        again = parse_message(encoded, classic=classic)
        assert again.attributes == parsed.attributes
        assert (again.message_method, again.message_class) == (
            parsed.message_method,
            parsed.message_class,
        )


@given(st.one_of(st.binary(max_size=200), stun_message()))
def test_arbitrary_bytes_parse_cleanly(data: bytes) -> None:
    parses_cleanly(data)


@given(mutated(st.one_of(message().map(bytes), message().map(_signed), stun_message())))
def test_mutated_messages_parse_cleanly(data: bytes) -> None:
    parses_cleanly(data)


@given(st.binary(max_size=100))
def test_parse_channel_data_raises_only_value_error(data: bytes) -> None:
    for candidate in (b"\x40" + data, data):
        try:
            frame = parse_channel_data(candidate)
        except ValueError:
            continue
        assert parse_channel_data(bytes(frame)) == frame
        assert parse_channel_data(frame.padded()) == frame


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_framer_raises_only_value_error_and_holds_at_most_one_frame(chunks: list[bytes]) -> None:
    framer = StreamFramer()
    try:
        for chunk in chunks:
            for frame in framer.feed(chunk):
                assert len(frame) <= 20 + 0xFFFF
    except ValueError:
        return
    assert framer.buffered < 4 + 0xFFFF + 3


# -- the server --------------------------------------------------------------------------


def answers_are_well_formed(sent: list[tuple[Any, bytes, Any]]) -> None:
    for _, data, _ in sent:
        if is_channel_data(data):
            parse_channel_data(data)
            continue
        answer = parse_message(data, classic=True)
        if answer.message_class == Class.INDICATION:
            assert answer.message_method == Method.DATA
        else:
            assert answer.message_class in (Class.RESPONSE, Class.ERROR)


@given(st.lists(st.one_of(st.binary(max_size=120), stun_message()), max_size=10))
def test_server_never_raises_and_answers_only_requests(packets: list[bytes]) -> None:
    server, network = make_server(rate=5, burst=5)
    for i, packet in enumerate(packets):
        server.receive(packet, TCP if i % 2 else UDP, NOW + i)
    answers_are_well_formed(network.sent)
    assert len(network.sent) <= len(packets)
    assert network.relays == {}  # no credentials, so no allocation


PEER_LIST = [
    PEER,
    ("45.67.89.11", 6000),
    ("2a00:1450::1", 7000),
    ("127.0.0.1", 22),
    ("10.0.0.1", 5432),
    ("100.64.0.1", 80),
    ("169.254.169.254", 80),
    ("198.18.0.1", 80),
    ("::ffff:127.0.0.1", 22),
    ("64:ff9b::a00:1", 80),
    ("fd00::1", 80),
]
PUBLIC = [p for p in PEER_LIST if PeerPolicy().allows(p[0])]
PEERS = st.one_of(st.sampled_from(PUBLIC), st.sampled_from(PEER_LIST))  # half the time public
CHANNELS = st.one_of(st.integers(0x4000, 0x4003), st.integers(0, 0xFFFF))
POLICY = PeerPolicy()


class TurnSession(RuleBasedStateMachine):
    """One authenticated TURN client (UDP) doing what clients do, in any order, with its
    signed requests sometimes mutated on the wire, and peers sending to its relays."""

    def __init__(self) -> None:
        super().__init__()
        hosts = {4: RelayHost("0.0.0.0", "192.0.2.1"), 6: RelayHost("::", "2001:db8::1")}
        self.server, self.network = make_server(max_allocations=2, relay_hosts=hosts)
        self.client = Client(self.server, self.network, UDP)
        self.client.request(Method.BINDING, sign=False)  # learns the nonce

    def _signed(self, method: Method, attributes: dict[str, Any]) -> Message:
        request = Message(method, Class.REQUEST, attributes=dict(attributes))
        request.attributes.update(
            {"USERNAME": self.client.username, "REALM": "example.org", "NONCE": self.client.nonce}
        )
        request.add_message_integrity(self.client.key)
        return request

    def _deliver(self, data: bytes) -> Message | None:
        """Send ``data``; the answer, if it was a STUN message (learning a new nonce)."""
        before = len(self.network.sent)
        self.server.receive(data, UDP, self.client.now)
        assert len(self.network.sent) - before <= 1  # at most one answer
        if len(self.network.sent) == before or is_channel_data(self.network.sent[-1][1]):
            return None
        answer = parse_message(self.network.sent[-1][1], classic=True)
        if answer.error_code == 438:  # the nonce went stale with time: take the new one
            self.client.nonce = answer.attributes["NONCE"]
        return answer

    def _request(self, method: Method, attributes: dict[str, Any]) -> None:
        """A signed request, sent again once if the nonce was stale."""
        answer = self._deliver(bytes(self._signed(method, attributes)))
        if answer is not None and answer.error_code == 438:
            self._deliver(bytes(self._signed(method, attributes)))

    @rule(
        family=st.sampled_from([None, None, 1, 2, 3]),
        lifetime=st.one_of(st.none(), U32),
        even=st.one_of(st.none(), st.booleans()),
    )
    def allocate(self, family: int | None, lifetime: int | None, even: bool | None) -> None:
        attributes: dict[str, Any] = {"REQUESTED-TRANSPORT": 17}
        for name, value in (
            ("REQUESTED-ADDRESS-FAMILY", family),
            ("LIFETIME", lifetime),
            ("EVEN-PORT", even),
        ):
            if value is not None:
                attributes[name] = value
        self._request(Method.ALLOCATE, attributes)

    @rule(peers=st.lists(PEERS, min_size=1, max_size=3))
    def create_permission(self, peers: list[tuple[str, int]]) -> None:
        self._request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": peers})

    @rule(number=CHANNELS, peer=PEERS)
    def channel_bind(self, number: int, peer: tuple[str, int]) -> None:
        attributes = {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": [peer]}
        self._request(Method.CHANNEL_BIND, attributes)

    @rule(lifetime=st.one_of(st.just(0), U32))
    def refresh(self, lifetime: int) -> None:
        self._request(Method.REFRESH, {"LIFETIME": lifetime})

    @rule(peer=PEERS, data=st.binary(max_size=64))
    def send(self, peer: tuple[str, int], data: bytes) -> None:
        indication = Message(Method.SEND, Class.INDICATION)
        indication.attributes.update({"XOR-PEER-ADDRESS": [peer], "DATA": data})
        self._deliver(bytes(indication))

    @rule(number=CHANNELS, data=st.binary(max_size=64), stream=st.booleans())
    def channel_data(self, number: int, data: bytes, stream: bool) -> None:
        frame = ChannelData(min(max(number, 0x4000), 0x4FFF), data)
        self._deliver(frame.padded() if stream else bytes(frame))

    @rule(
        method=st.sampled_from(list(Method)),
        attributes=st.dictionaries(st.sampled_from(sorted(VALUES)), st.just(None), max_size=4),
        data=st.data(),
    )
    def mutated_request(self, method: Method, attributes: dict[str, None], data: Any) -> None:
        values = {name: data.draw(VALUES[name]) for name in attributes}
        signed = bytes(self._signed(method, values))
        self._deliver(data.draw(mutated(st.just(signed))))

    @precondition(lambda self: bool(self.network.relays))
    @rule(peer=PEERS, data=st.binary(max_size=64), pick=st.integers(0, 3))
    def from_peer(self, peer: tuple[str, int], data: bytes, pick: int) -> None:
        relays = sorted(self.network.relays)
        self.server.receive_from_peer(relays[pick % len(relays)], data, peer, self.client.now)

    @rule(seconds=st.sampled_from([1, 1, 30, 299, 301, 600, 3600]))
    def tick(self, seconds: int) -> None:
        self.client.now += seconds
        self.server.tick(self.client.now)

    @invariant()
    def relays_reach_only_allowed_peers(self) -> None:
        for _, peer, _ in self.network.to_peers:
            assert POLICY.allows(peer[0]), peer

    @invariant()
    def answers_are_answers(self) -> None:
        answers_are_well_formed(self.network.sent)
        self.network.sent.clear()

    @invariant()
    def relays_are_bounded(self) -> None:
        assert len(self.network.relays) <= 2 * 2  # max_allocations, each at most v4 + v6


TestTurnSession = TurnSession.TestCase
# About 17 ms a case of 50 steps: a quarter of the campaign's examples is ~15 minutes of CPU.
TestTurnSession.settings = fuzz_budget(0.25, stateful_step_count=50)


def test_peer_strategy_covers_both_verdicts() -> None:
    verdicts = {POLICY.allows(host) for host, _ in PEER_LIST}
    assert verdicts == {True, False}
    assert ipaddress.ip_address(PEER[0]).is_global
