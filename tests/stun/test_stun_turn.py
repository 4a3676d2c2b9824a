"""The sans-IO TURN core behind the STUN server: authentication, allocations, permissions,
channels, quotas, peer policy and relaying, with time passed in."""

from __future__ import annotations

import pytest

from stun.auth import NONCE_LIFETIME, PASSWORD_ALGORITHMS
from stun.message import (
    PASSWORD_SHA256,
    ChannelData,
    Class,
    Message,
    Method,
    long_term_key,
    message_integrity,
    parse_channel_data,
    parse_message,
)
from stun.network import Endpoint
from stun.turn import RelayHost
from tests.stun.fakes import (
    CLIENT,
    NOW,
    PEER,
    REALM,
    SERVER,
    TCP,
    UDP,
    Client,
    make_server,
)


def code(response: Message) -> int | None:
    return response.error_code


# ---------------------------------------------------------------------------------------------
# Authentication


def test_first_request_gets_401_with_realm_and_nonce() -> None:
    server, network = make_server()
    response = Client(server, network).send(Message(Method.ALLOCATE, Class.REQUEST))
    assert response is not None
    assert response.attributes["ERROR-CODE"] == (401, "Unauthenticated")
    assert response.attributes["REALM"] == REALM
    assert response.attributes["NONCE"].startswith(b"obMatJos2gAAA")
    assert response.attributes["PASSWORD-ALGORITHMS"] == PASSWORD_ALGORITHMS
    assert "MESSAGE-INTEGRITY" not in response.attributes


def test_allocate_succeeds_and_is_signed() -> None:
    server, network = make_server(min_port=50000, max_port=50100)
    client = Client(server, network)
    response = client.allocate()
    assert response.message_class == Class.RESPONSE, response
    assert response.check_message_integrity(client.key)
    [relayed] = response.attributes["XOR-RELAYED-ADDRESS"]
    assert relayed[0] == SERVER[0] and 50000 <= relayed[1] <= 50100
    assert list(network.relays) == [("0.0.0.0", relayed[1])]
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert response.attributes["LIFETIME"] == 600
    assert server.stats.allocations_active == server.stats.allocations_total == 1


def test_expired_credentials_are_401() -> None:
    server, network = make_server()
    client = Client(server, network, ttl=60)
    client.now = NOW + 61
    response = client.allocate()
    assert code(response) == 401
    assert "MESSAGE-INTEGRITY" not in response.attributes
    assert not network.relays


def test_forged_credentials_are_401() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.password = "guessed"
    assert code(client.allocate()) == 401
    forged = Client(server, network)
    forged.username = "9999999999:alice@example.org"  # extended expiry, old password
    assert code(forged.allocate()) == 401
    assert server.stats.errors[401] >= 2


def test_wrong_realm_is_401() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)  # learn a nonce
    request = Message(Method.ALLOCATE, Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17})
    request.attributes.update(
        {"USERNAME": client.username, "REALM": "other.org", "NONCE": client.nonce}
    )
    request.add_message_integrity(long_term_key(client.username, "other.org", client.password))
    response = client.send(request)
    assert response is not None and code(response) == 401


@pytest.mark.parametrize("missing", ["USERNAME", "REALM", "NONCE"])
def test_missing_credential_attribute_is_400(missing: str) -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)
    request = Message(Method.ALLOCATE, Class.REQUEST)
    request.attributes.update({"USERNAME": client.username, "REALM": REALM, "NONCE": client.nonce})
    del request.attributes[missing]
    request.add_message_integrity(client.key)
    response = client.send(request)
    assert response is not None
    assert response.attributes["ERROR-CODE"] == (400, f"Missing {missing} attribute")


def test_stale_nonce_is_438_with_a_fresh_one() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)
    client.now = NOW + NONCE_LIFETIME + 1
    response = client.allocate()
    assert code(response) == 438
    assert response.attributes["REALM"] == REALM
    client.nonce = response.attributes["NONCE"]
    assert client.allocate().message_class == Class.RESPONSE


def test_nonce_is_bound_to_the_client_address() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)
    other = Client(server, network, Endpoint("udp", ("203.0.113.99", 1), SERVER))
    other.nonce = client.nonce
    assert code(other.allocate()) == 438


def test_sha256_password_algorithm() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)
    request = Message(Method.ALLOCATE, Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17})
    request.attributes.update(
        {
            "USERNAME": client.username,
            "REALM": REALM,
            "NONCE": client.nonce,
            "PASSWORD-ALGORITHMS": PASSWORD_ALGORITHMS,
            "PASSWORD-ALGORITHM": (PASSWORD_SHA256, b""),
        }
    )
    key = long_term_key(client.username, REALM, client.password, PASSWORD_SHA256)
    request.add_message_integrity_sha256(key)
    response = client.send(request)
    assert response is not None and response.message_class == Class.RESPONSE
    assert "MESSAGE-INTEGRITY" not in response.attributes
    assert response.check_message_integrity(key)


def test_password_algorithm_bid_down_is_400() -> None:
    server, network = make_server()
    client = Client(server, network)
    response = client.allocate(**{"PASSWORD-ALGORITHM": (1, b"")})  # without the list
    assert response.attributes["ERROR-CODE"] == (
        400,
        "PASSWORD-ALGORITHM does not match PASSWORD-ALGORITHMS",
    )
    tampered = client.allocate(
        **{"PASSWORD-ALGORITHMS": [(1, b"")], "PASSWORD-ALGORITHM": (1, b"")}
    )
    assert code(tampered) == 400


def with_length(data: bytes) -> bytes:
    return data[:2] + (len(data) - 20).to_bytes(2, "big") + data[4:]


def test_unknown_attribute_in_turn_request_is_420_after_authentication() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.request(Method.BINDING)
    request = Message(Method.ALLOCATE, Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17})
    request.attributes.update({"USERNAME": client.username, "REALM": REALM, "NONCE": client.nonce})
    unsigned = with_length(bytes(request) + bytes.fromhex("7ff00000"))  # empty, required
    mac = message_integrity(unsigned, client.key)
    response = client.send(with_length(unsigned + bytes.fromhex("00080014") + mac))
    assert response is not None
    assert response.attributes["ERROR-CODE"] == (420, "Unknown Attribute")
    assert response.attributes["UNKNOWN-ATTRIBUTES"] == [0x7FF0]
    assert response.check_message_integrity(client.key)
    assert not network.relays
    # Without valid credentials, the unknown attribute is not even looked at.
    response = client.send(with_length(unsigned + bytes.fromhex("00080014") + bytes(20)))
    assert response is not None and code(response) == 401


# ---------------------------------------------------------------------------------------------
# Allocate


def test_allocate_retransmission_gets_the_same_answer_and_a_new_one_437() -> None:
    server, network = make_server()
    client = Client(server, network)
    first = client.allocate()
    again = client.request(
        Method.ALLOCATE, {"REQUESTED-TRANSPORT": 17}, transaction_id=first.transaction_id
    )
    assert again.attributes["XOR-RELAYED-ADDRESS"] == first.attributes["XOR-RELAYED-ADDRESS"]
    assert len(network.relays) == 1
    assert client.allocate().attributes["ERROR-CODE"] == (437, "Allocation already exists")


def test_requested_transport_is_required_and_udp() -> None:
    server, network = make_server()
    client = Client(server, network)
    assert client.request(Method.ALLOCATE).attributes["ERROR-CODE"] == (
        400,
        "Missing REQUESTED-TRANSPORT attribute",
    )
    assert code(client.request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": 6})) == 442


def test_lifetime_is_capped_and_never_below_the_default() -> None:
    server, network = make_server()
    assert Client(server, network).allocate(LIFETIME=99999).attributes["LIFETIME"] == 3600
    other = Client(server, network, TCP)
    assert other.allocate(LIFETIME=30).attributes["LIFETIME"] == 600


def test_per_user_quota_is_486() -> None:
    server, network = make_server(max_allocations_per_user=2)
    for port in (1, 2):
        client = Client(server, network, Endpoint("udp", ("203.0.113.10", port), SERVER))
        assert client.allocate().message_class == Class.RESPONSE
    third = Client(server, network, Endpoint("udp", ("203.0.113.10", 3), SERVER))
    assert third.allocate().attributes["ERROR-CODE"] == (486, "Allocation Quota Reached")
    # Another expiry stamp is the same user; another user is not.
    again = Client(server, network, Endpoint("udp", ("203.0.113.10", 4), SERVER), ttl=7200)
    assert code(again.allocate()) == 486
    bob = Client(server, network, Endpoint("udp", ("203.0.113.10", 5), SERVER), user="bob")
    assert bob.allocate().message_class == Class.RESPONSE


def test_total_quota_is_508() -> None:
    server, network = make_server(max_allocations=1)
    assert Client(server, network).allocate().message_class == Class.RESPONSE
    bob = Client(server, network, TCP, user="bob")
    assert code(bob.allocate()) == 508


def test_no_free_relay_port_is_508() -> None:
    server, network = make_server(min_port=50000, max_port=50001)
    network.busy = {("0.0.0.0", 50000), ("0.0.0.0", 50001)}
    response = Client(server, network).allocate()
    assert response.attributes["ERROR-CODE"] == (508, "No relay port is free")
    assert server.stats.allocations_active == 0


def test_relay_ports_do_not_collide() -> None:
    server, network = make_server(min_port=50000, max_port=50002)
    ports = set()
    for port in range(3):
        client = Client(
            server, network, Endpoint("udp", ("203.0.113.10", port + 1), SERVER), user=str(port)
        )
        ports.add(client.allocate().attributes["XOR-RELAYED-ADDRESS"][0][1])
    assert ports == {50000, 50001, 50002}


def test_dont_fragment_reaches_the_relay_socket() -> None:
    server, network = make_server()
    Client(server, network).allocate(**{"DONT-FRAGMENT": None})
    assert list(network.relays.values()) == [True]


def test_even_port_with_reservation() -> None:
    server, network = make_server(min_port=50000, max_port=50999)
    client = Client(server, network)
    response = client.allocate(**{"EVEN-PORT": True})
    port = response.attributes["XOR-RELAYED-ADDRESS"][0][1]
    assert port % 2 == 0
    token = response.attributes["RESERVATION-TOKEN"]
    assert ("0.0.0.0", port + 1) in network.relays
    other = Client(server, network, TCP)
    response = other.allocate(**{"RESERVATION-TOKEN": token})
    assert response.attributes["XOR-RELAYED-ADDRESS"] == [(SERVER[0], port + 1)]
    # A token serves once.
    third = Client(server, network, Endpoint("udp", ("203.0.113.10", 9), SERVER))
    assert code(third.allocate(**{"RESERVATION-TOKEN": token})) == 508


def test_unused_reservation_expires() -> None:
    server, network = make_server()
    client = Client(server, network)
    response = client.allocate(**{"EVEN-PORT": True})
    reserved = ("0.0.0.0", response.attributes["XOR-RELAYED-ADDRESS"][0][1] + 1)
    server.tick(NOW + 31)
    assert reserved in network.closed


def test_expired_reservation_token_is_508_and_frees_the_port() -> None:
    server, network = make_server()
    response = Client(server, network).allocate(**{"EVEN-PORT": True})
    reserved = ("0.0.0.0", response.attributes["XOR-RELAYED-ADDRESS"][0][1] + 1)
    late = Client(server, network, TCP)
    late.now = NOW + 31  # before any sweep
    response = late.allocate(**{"RESERVATION-TOKEN": response.attributes["RESERVATION-TOKEN"]})
    assert response.attributes["ERROR-CODE"] == (508, "Reservation token is unknown or expired")
    assert reserved in network.closed


def test_even_port_without_reservation() -> None:
    server, network = make_server()
    response = Client(server, network).allocate(**{"EVEN-PORT": False})
    assert response.attributes["XOR-RELAYED-ADDRESS"][0][1] % 2 == 0
    assert "RESERVATION-TOKEN" not in response.attributes
    assert len(network.relays) == 1


def test_reservation_token_with_even_port_is_400() -> None:
    server, network = make_server()
    response = Client(server, network).allocate(
        **{"EVEN-PORT": False, "RESERVATION-TOKEN": b"12345678"}
    )
    assert code(response) == 400


def test_ipv6_relay_on_request() -> None:
    hosts = {4: RelayHost("0.0.0.0", "192.0.2.1"), 6: RelayHost("::", "2001:db8::1")}
    server, network = make_server(relay_hosts=hosts)
    response = Client(server, network).allocate(**{"REQUESTED-ADDRESS-FAMILY": 2})
    [(host, _)] = response.attributes["XOR-RELAYED-ADDRESS"]
    assert host == "2001:db8::1"


def test_unsupported_address_family_is_440() -> None:
    server, network = make_server()
    response = Client(server, network).allocate(**{"REQUESTED-ADDRESS-FAMILY": 2})
    assert response.attributes["ERROR-CODE"] == (440, "Address Family not Supported")


def test_dual_stack_allocation() -> None:
    hosts = {4: RelayHost("0.0.0.0", "192.0.2.1"), 6: RelayHost("::", "2001:db8::1")}
    server, network = make_server(relay_hosts=hosts)
    response = Client(server, network).allocate(**{"ADDITIONAL-ADDRESS-FAMILY": 2})
    hosts_given = [host for host, _ in response.attributes["XOR-RELAYED-ADDRESS"]]
    assert hosts_given == ["192.0.2.1", "2001:db8::1"]
    assert len(network.relays) == 2


def test_dual_stack_without_ipv6_reports_address_error() -> None:
    server, network = make_server()
    response = Client(server, network).allocate(**{"ADDITIONAL-ADDRESS-FAMILY": 2})
    assert response.message_class == Class.RESPONSE
    assert len(response.attributes["XOR-RELAYED-ADDRESS"]) == 1
    assert response.attributes["ADDRESS-ERROR-CODE"] == (2, 440, "Address Family not Supported")


# ---------------------------------------------------------------------------------------------
# Refresh


def test_refresh_extends_and_zero_deletes() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.allocate()
    client.now = NOW + 500
    assert client.request(Method.REFRESH, {"LIFETIME": 1200}).attributes["LIFETIME"] == 1200
    server.tick(NOW + 1000)  # would have expired at NOW + 600
    assert server.stats.allocations_active == 1
    response = client.request(Method.REFRESH, {"LIFETIME": 0})
    assert response.attributes["LIFETIME"] == 0
    assert network.relays == {}
    assert server.stats.allocations_active == 0
    assert code(client.request(Method.REFRESH)) == 437


def test_refresh_without_allocation_is_437() -> None:
    server, network = make_server()
    response = Client(server, network).request(Method.REFRESH)
    assert response.attributes["ERROR-CODE"] == (437, "Allocation does not exist")
    assert response.check_message_integrity(Client(server, network).key)


def test_other_username_on_the_allocation_is_441() -> None:
    server, network = make_server()
    Client(server, network).allocate()
    bob = Client(server, network, user="bob")
    assert code(bob.request(Method.REFRESH)) == 441


def test_refresh_with_other_family_is_443() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.allocate()
    assert code(client.request(Method.REFRESH, {"REQUESTED-ADDRESS-FAMILY": 2})) == 443


def test_allocation_expires() -> None:
    server, network = make_server()
    client = Client(server, network)
    client.allocate()
    server.tick(NOW + 599)
    assert network.relays
    server.tick(NOW + 600)
    assert not network.relays
    assert server.stats.allocations_active == 0
    assert server.stats.allocations_total == 1


def test_tcp_allocation_ends_with_its_connection() -> None:
    server, network = make_server()
    Client(server, network, TCP).allocate()
    server.connection_lost(UDP)
    assert network.relays
    server.connection_lost(TCP)
    assert not network.relays


# ---------------------------------------------------------------------------------------------
# Permissions, channels and the peer policy


def allocated(endpoint: Endpoint = UDP, **kwargs: object) -> tuple[Client, tuple[str, int]]:
    server, network = make_server(**kwargs)  # type: ignore[arg-type]
    client = Client(server, network, endpoint)
    response = client.allocate()
    return client, ("0.0.0.0", response.attributes["XOR-RELAYED-ADDRESS"][0][1])


@pytest.mark.parametrize(
    "peer",
    [
        ("127.0.0.1", 80),
        ("10.1.2.3", 80),
        ("172.16.0.1", 80),
        ("192.168.1.1", 80),
        ("169.254.169.254", 80),
        ("0.0.0.0", 80),
        ("224.0.0.1", 80),
        ("255.255.255.255", 80),
        ("100.64.0.1", 80),  # carrier-grade NAT (issue 13, defect 8)
        ("100.127.255.254", 80),
        ("198.18.0.5", 80),
        ("198.19.255.1", 80),
        ("192.0.0.10", 80),
        ("192.0.2.1", 80),
        ("198.51.100.7", 80),
        ("203.0.113.9", 80),
        ("240.0.0.1", 80),
        ("192.88.99.1", 80),
    ],
)
def test_private_peers_are_403(peer: tuple[str, int]) -> None:
    client, _ = allocated()
    response = client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [peer]})
    assert response.attributes["ERROR-CODE"] == (403, "Peer address is not allowed")
    assert response.check_message_integrity(client.key)
    bind = client.request(
        Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": [peer]}
    )
    assert code(bind) == 403


@pytest.mark.parametrize(
    "peer",
    [
        "::1",
        "fd00::1",
        "fe80::1",
        "::",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:100.64.0.1",
        "fec0::1",  # site-local
        "100::1",  # discard-only
        "2001:db8::9",  # documentation
        "3fff::1",
        "2001:2::1",  # benchmarking
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::1",  # local-use NAT64
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1 (deprecated)
    ],
)
def test_private_ipv6_peers_are_403(peer: str) -> None:
    hosts = {6: RelayHost("::", "2001:db8::1")}
    server, network = make_server(relay_hosts=hosts)
    client = Client(server, network)
    assert client.allocate(**{"REQUESTED-ADDRESS-FAMILY": 2}).message_class == Class.RESPONSE
    response = client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [(peer, 1)]})
    assert code(response) == 403


def test_allowed_peers_open_private_ranges() -> None:
    client, _ = allocated(allowed=("127.0.0.0/8", "10.0.0.0/8"))
    response = client.request(
        Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [("127.0.0.1", 1), ("10.9.9.9", 2)]}
    )
    assert response.message_class == Class.RESPONSE
    assert (
        code(client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [("192.168.0.1", 1)]}))
        == 403
    )


def test_benchmarking_range_is_denied_unless_allowed() -> None:
    client, _ = allocated()  # NAT labs use 198.18.0.0/15 as "the Internet": they allow it
    peer = {"XOR-PEER-ADDRESS": [("198.18.0.5", 1)]}
    assert code(client.request(Method.CREATE_PERMISSION, peer)) == 403
    client, _ = allocated(allowed=("198.18.0.0/15",))
    assert client.request(Method.CREATE_PERMISSION, peer).message_class == Class.RESPONSE


def test_permission_is_all_or_nothing() -> None:
    client, relay = allocated()
    response = client.request(
        Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [PEER, ("127.0.0.1", 1)]}
    )
    assert code(response) == 403
    sent = len(client.network.sent)
    client.server.receive_from_peer(relay, b"hi", PEER, client.now)
    assert len(client.network.sent) == sent  # PEER got no permission either


def test_peer_family_mismatch_is_443() -> None:
    client, _ = allocated()
    response = client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [("2001:db8::9", 1)]})
    assert code(response) == 443


def test_create_permission_needs_a_peer() -> None:
    client, _ = allocated()
    response = client.request(Method.CREATE_PERMISSION)
    assert response.attributes["ERROR-CODE"] == (400, "Missing XOR-PEER-ADDRESS attribute")


def test_send_and_data_indications() -> None:
    client, relay = allocated()
    server, network = client.server, client.network
    send = Message(Method.SEND, Class.INDICATION)
    send.attributes.update({"XOR-PEER-ADDRESS": [PEER], "DATA": b"ping"})
    assert client.send(send) is None
    assert network.to_peers == []  # no permission yet
    client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [PEER]})
    client.send(send)
    assert network.to_peers == [(relay, PEER, b"ping")]
    # Any port of a permitted IP may answer (RFC 8656 permissions are per IP address).
    server.receive_from_peer(relay, b"pong", (PEER[0], 6000), NOW)
    indication = parse_message(network.sent[-1][1])
    assert (indication.message_method, indication.message_class) == (Method.DATA, Class.INDICATION)
    assert indication.attributes == {"XOR-PEER-ADDRESS": [(PEER[0], 6000)], "DATA": b"pong"}
    # Strangers are not relayed.
    before = len(network.sent)
    server.receive_from_peer(relay, b"spam", ("198.51.100.99", 1), NOW)
    assert len(network.sent) == before
    assert server.stats.relayed_packets == 2
    assert server.stats.relayed_bytes == 8


def test_send_to_denied_peer_is_dropped_even_with_allowed_permission_race() -> None:
    client, relay = allocated()
    send = Message(Method.SEND, Class.INDICATION)
    send.attributes.update({"XOR-PEER-ADDRESS": [("127.0.0.1", 22)], "DATA": b"x"})
    client.send(send)
    assert client.network.to_peers == []


def test_permissions_expire_after_five_minutes() -> None:
    client, relay = allocated()
    client.request(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": [PEER]})
    before = len(client.network.sent)
    client.server.receive_from_peer(relay, b"a", PEER, NOW + 299)
    assert len(client.network.sent) == before + 1
    client.server.tick(NOW + 300)
    client.server.receive_from_peer(relay, b"b", PEER, NOW + 300)
    assert len(client.network.sent) == before + 1


@pytest.mark.parametrize("endpoint", [UDP, TCP])
def test_channel_bind_and_channel_data(endpoint: Endpoint) -> None:
    client, relay = allocated(endpoint)
    server, network = client.server, client.network
    response = client.request(
        Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": [PEER]}
    )
    assert response.message_class == Class.RESPONSE
    assert response.check_message_integrity(client.key)
    client.send(bytes(ChannelData(0x4001, b"hello")))
    assert network.to_peers == [(relay, PEER, b"hello")]
    server.receive_from_peer(relay, b"world", PEER, NOW)
    data = network.sent[-1][1]
    assert parse_channel_data(data) == ChannelData(0x4001, b"world")
    # Over a stream, ChannelData is padded to 4 bytes (RFC 8656 section 12.5).
    assert len(data) == (12 if endpoint.stream else 9)
    # Unbound channels go nowhere.
    client.send(bytes(ChannelData(0x4002, b"lost")))
    assert len(network.to_peers) == 1


def test_channel_rules() -> None:
    client, _ = allocated()
    other_peer = ("45.67.89.11", 5000)

    def bind(number: int, peer: tuple[str, int]) -> Message:
        return client.request(
            Method.CHANNEL_BIND, {"CHANNEL-NUMBER": number, "XOR-PEER-ADDRESS": [peer]}
        )

    assert bind(0x3FFF, PEER).attributes["ERROR-CODE"] == (400, "Channel number is out of range")
    assert code(bind(0x5000, PEER)) == 400
    assert bind(0x4000, PEER).message_class == Class.RESPONSE
    assert bind(0x4000, PEER).message_class == Class.RESPONSE  # a refresh
    assert bind(0x4000, other_peer).attributes["ERROR-CODE"] == (
        400,
        "Channel is bound to another peer",
    )
    assert bind(0x4001, PEER).attributes["ERROR-CODE"] == (400, "Peer is bound to another channel")
    response = client.request(Method.CHANNEL_BIND, {"XOR-PEER-ADDRESS": [PEER]})
    assert response.attributes["ERROR-CODE"] == (400, "Missing CHANNEL-NUMBER attribute")


def test_channel_keeps_its_peers_permission_alive() -> None:
    """aioice refreshes channels every 500 s and never sends CreatePermission."""
    client, relay = allocated()
    client.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": [PEER]})
    client.server.tick(NOW + 400)
    before = len(client.network.sent)
    client.server.receive_from_peer(relay, b"still here", PEER, NOW + 400)
    assert len(client.network.sent) == before + 1
    client.now = NOW + 500
    client.request(Method.REFRESH)
    client.server.tick(NOW + 601)  # the channel is gone now, and with it the permission
    client.server.receive_from_peer(relay, b"gone", PEER, NOW + 601)
    assert len(client.network.sent) == before + 2  # only the Refresh response


def test_data_for_another_endpoint_is_ignored() -> None:
    client, _ = allocated()
    client.request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": [PEER]})
    stranger = Client(client.server, client.network, Endpoint("udp", ("203.0.113.50", 1), SERVER))
    stranger.send(bytes(ChannelData(0x4000, b"x")))
    assert client.network.to_peers == []


def test_close_frees_every_socket() -> None:
    client, _ = allocated()
    client.allocate()
    assert client.server.turn is not None
    client.server.turn.close()
    assert client.network.relays == {}
