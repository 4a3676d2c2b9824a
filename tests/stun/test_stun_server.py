"""The sans-IO STUN server: Binding, RFC 5780, RFC 3489 clients, drops, rate limits."""

from __future__ import annotations

import struct

import pytest

from stun.binding import binding_success, software_attribute
from stun.message import Class, Message, Method, parse_message
from stun.network import Endpoint
from stun.ratelimit import RateLimiter
from stun.server import Alternate
from tests.stun.fakes import CLIENT, NOW, SERVER, TCP, UDP, Client, make_server

ALTERNATE = Alternate(("192.0.2.1", "192.0.2.2"), (3478, 3479))


def binding(**attributes: object) -> Message:
    return Message(Method.BINDING, Class.REQUEST, attributes=dict(attributes))


def test_binding_returns_the_mapped_address() -> None:
    server, network = make_server(turn=False)
    request = binding()
    response = Client(server, network).send(request)
    assert response is not None
    assert response.message_class == Class.RESPONSE
    assert response.transaction_id == request.transaction_id
    assert response.attributes == {"XOR-MAPPED-ADDRESS": CLIENT, "SOFTWARE": "natterd"}
    assert network.sent[-1][2] is None  # answered from the address it was sent to
    assert server.stats.requests["BINDING"] == 1


def test_binding_over_ipv6_and_tcp() -> None:
    server, network = make_server(turn=False)
    endpoint = Endpoint("tcp", ("2001:db8::7", 50000), ("2001:db8::1", 3478))
    response = Client(server, network, endpoint).send(binding())
    assert response is not None
    assert response.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 50000)


def test_fingerprint_is_echoed() -> None:
    server, network = make_server(turn=False)
    request = binding()
    request.add_fingerprint()
    response = Client(server, network).send(request)
    assert response is not None
    assert list(response.attributes)[-1] == "FINGERPRINT"  # parse_message checked it


def test_unknown_comprehension_required_attribute_is_420() -> None:
    server, network = make_server(turn=False)
    data = bytes(binding()) + bytes.fromhex("7ff00000 c0010000")  # required + optional
    data = data[:2] + struct.pack("!H", 8) + data[4:]
    response = Client(server, network).send(data)
    assert response is not None
    assert response.message_class == Class.ERROR
    assert response.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert response.attributes["UNKNOWN-ATTRIBUTES"] == [0x7FF0]
    assert server.stats.errors[420] == 1


def test_classic_rfc3489_binding_gets_mapped_address_only() -> None:
    server, network = make_server(turn=False)
    # Debian's `stun` 0.97: no magic cookie, CHANGE-REQUEST without flags.
    request = bytes.fromhex("00010008 010bc077da2aa041ba2552508e0ced5c 00030004 00000000")
    response = Client(server, network).send(request)
    assert response is not None
    assert response.classic
    assert response.transaction_id == request[4:20]
    assert response.attributes == {"MAPPED-ADDRESS": CLIENT}


def test_classic_messages_other_than_binding_are_dropped() -> None:
    server, network = make_server()
    request = bytes.fromhex("00030000 010bc077da2aa041ba2552508e0ced5c")
    assert Client(server, network).send(request) is None
    assert server.stats.dropped == 1


def test_rfc5780_other_address_and_response_origin() -> None:
    server, network = make_server(turn=False, alternate=ALTERNATE)
    response = Client(server, network).send(binding())
    assert response is not None
    assert response.attributes["RESPONSE-ORIGIN"] == SERVER
    assert response.attributes["OTHER-ADDRESS"] == ("192.0.2.2", 3479)
    assert network.sent[-1][2] == SERVER


def test_rfc5780_change_request_moves_the_source() -> None:
    server, network = make_server(turn=False, alternate=ALTERNATE)
    client = Client(server, network, Endpoint("udp", CLIENT, ("192.0.2.2", 3479)))
    for flags, source in [
        (0x6, ("192.0.2.1", 3478)),
        (0x4, ("192.0.2.1", 3479)),
        (0x2, ("192.0.2.2", 3478)),
        (0x0, ("192.0.2.2", 3479)),
    ]:
        response = client.send(binding(**{"CHANGE-REQUEST": flags}))
        assert response is not None
        assert response.attributes["RESPONSE-ORIGIN"] == source
        assert response.attributes["OTHER-ADDRESS"] == ("192.0.2.1", 3478)
        assert network.sent[-1][2] == source


def test_rfc5780_for_classic_clients() -> None:
    server, network = make_server(turn=False, alternate=ALTERNATE)
    request = bytes.fromhex("00010008 010bc077da2aa041ba2552508e0ced5c 00030004 00000006")
    response = Client(server, network).send(request)
    assert response is not None
    assert response.attributes == {
        "MAPPED-ADDRESS": CLIENT,
        "SOURCE-ADDRESS": ("192.0.2.2", 3479),
        "CHANGED-ADDRESS": ("192.0.2.2", 3479),
    }


def test_change_request_without_alternate_is_420() -> None:
    server, network = make_server(turn=False)
    client = Client(server, network)
    response = client.send(binding(**{"CHANGE-REQUEST": 0x4}))
    assert response is not None
    assert response.attributes["ERROR-CODE"][0] == 420
    assert response.attributes["UNKNOWN-ATTRIBUTES"] == [0x0003]
    response = client.send(binding(**{"CHANGE-REQUEST": 0}))
    assert response is not None and response.message_class == Class.RESPONSE


def test_change_request_over_tcp_is_420_even_with_alternate() -> None:
    server, network = make_server(turn=False, alternate=ALTERNATE)
    response = Client(server, network, TCP).send(binding(**{"CHANGE-REQUEST": 0x2}))
    assert response is not None and response.error_code == 420


def test_unparseable_packets_are_dropped_silently() -> None:
    server, network = make_server()
    client = Client(server, network)
    for junk in [b"", b"\x00", b"\x00\x01\x00\x00", b"\xff" * 40, bytes(binding())[:-1]]:
        assert client.send(junk) is None
    assert server.stats.dropped == 5


def test_responses_and_indications_get_no_answer() -> None:
    server, network = make_server()
    client = Client(server, network)
    assert client.send(Message(Method.BINDING, Class.RESPONSE)) is None
    assert client.send(Message(Method.BINDING, Class.ERROR)) is None
    assert client.send(Message(Method.BINDING, Class.INDICATION)) is None  # keepalive
    assert server.stats.dropped == 2


def test_data_and_send_requests_are_400() -> None:
    server, network = make_server()
    for method in (Method.SEND, Method.DATA):
        response = Client(server, network).send(Message(method, Class.REQUEST))
        assert response is not None
        assert response.attributes["ERROR-CODE"] == (400, f"{method.name} is not a request")


def test_turn_requests_without_turn_are_400() -> None:
    server, network = make_server(turn=False)
    response = Client(server, network).send(Message(Method.ALLOCATE, Class.REQUEST))
    assert response is not None
    assert response.attributes["ERROR-CODE"] == (400, "TURN is not offered here")


def test_requests_over_the_rate_are_dropped() -> None:
    server, network = make_server(turn=False, rate=2, burst=3)
    client = Client(server, network)
    assert [client.send(binding()) is not None for _ in range(5)] == [True] * 3 + [False] * 2
    assert server.stats.rate_limited == 2
    client.now = NOW + 0.5  # one token back
    assert [client.send(binding()) is not None for _ in range(2)] == [True, False]
    # Another source has its own bucket.
    other = Client(server, network, Endpoint("udp", ("203.0.113.11", 1), SERVER))
    assert other.send(binding()) is not None


def test_rate_limit_spares_indications() -> None:
    server, network = make_server(rate=1, burst=1)
    client = Client(server, network)
    assert client.send(binding()) is not None
    for _ in range(5):
        client.send(Message(Method.BINDING, Class.INDICATION))
    assert server.stats.rate_limited == 0


def test_rate_limiter_bounds_its_table_and_prunes() -> None:
    limiter = RateLimiter(rate=1, burst=2, max_sources=2)
    assert limiter.allow("a", 0) and limiter.allow("b", 0)
    # The table is full: unknown sources share one bucket.
    assert limiter.allow("c", 0) and limiter.allow("d", 0)
    assert not limiter.allow("e", 0)
    assert len(limiter) == 3
    limiter.prune(10)
    assert len(limiter) == 0
    assert limiter.allow("e", 10)


def test_unlimited_rate() -> None:
    limiter = RateLimiter(rate=0, burst=1)
    assert all(limiter.allow("a", 0) for _ in range(1000))
    assert len(limiter) == 0


def test_response_bytes_are_well_formed() -> None:
    server, network = make_server(turn=False)
    Client(server, network).send(binding())
    parse_message(network.sent[-1][1])
    assert network.sent[-1][0] == UDP


def _general_path_answer(request: bytes, endpoint: Endpoint, software: str | None) -> bytes:
    """What the parser-and-attribute-table path sends for ``request``."""
    server, network = make_server(turn=False, alternate=None)
    server.software = software
    server._request(parse_message(request), endpoint, NOW)
    return network.sent[-1][1]


@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize("software", ["natterd", "natterd 1.0", None])
@pytest.mark.parametrize(
    "endpoint",
    [UDP, Endpoint("tcp", ("2001:db8::7", 50000), ("2001:db8::1", 3478))],
    ids=["ipv4-udp", "ipv6-tcp"],
)
def test_plain_binding_fast_answer_is_the_general_answer_byte_for_byte(
    fingerprint: bool, software: str | None, endpoint: Endpoint
) -> None:
    request = binding()
    if fingerprint:
        request.add_fingerprint()
    data = bytes(request)
    fast = binding_success(data, endpoint.client, software_attribute(software))
    assert fast is not None
    assert fast == _general_path_answer(data, endpoint, software)
    parsed = parse_message(fast)  # checks the FINGERPRINT
    assert parsed.attributes["XOR-MAPPED-ADDRESS"] == endpoint.client


def test_only_plain_binding_requests_take_the_fast_answer() -> None:
    plain = bytes(binding())
    corrupt = binding()
    corrupt.add_fingerprint()
    bad_crc = bytes(corrupt)[:-1] + bytes([bytes(corrupt)[-1] ^ 1])
    others = {
        "with an attribute": bytes(binding(**{"PRIORITY": 5})),
        "a bad FINGERPRINT": bad_crc,
        "an indication": bytes(Message(Method.BINDING, Class.INDICATION)),
        "RFC 3489 (no cookie)": plain[:4] + b"\x00\x00\x00\x00" + plain[8:],
        "a length that lies": plain[:2] + b"\x00\x08" + plain[4:],
        "truncated": plain[:19],
    }
    for what, data in others.items():
        assert binding_success(data, CLIENT, b"") is None, what
