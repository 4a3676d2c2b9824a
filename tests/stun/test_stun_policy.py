"""The relay peer policy: public unicast only, special-purpose ranges unless allowed."""

from __future__ import annotations

import ipaddress

import pytest

from stun.policy import DENIED_V4, DENIED_V6, PeerPolicy, embedded_v4


@pytest.mark.parametrize(
    "host",
    [
        "45.67.89.10",
        "8.8.8.8",
        "100.63.255.255",  # just below carrier-grade NAT
        "100.128.0.0",  # just above it
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2a00:1450:4001::1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo, client 8.8.8.8
    ],
)
def test_public_unicast_is_allowed(host: str) -> None:
    assert PeerPolicy().allows(host)


@pytest.mark.parametrize(
    "host",
    [
        "100.64.0.0",
        "100.127.255.255",
        "192.0.0.170",
        "198.18.0.0",
        "198.19.255.255",
        "255.255.255.255",
        "239.1.1.1",
        "fc00::1",
        "fdff:ffff::1",
        "fe80::1%eth0",  # a scoped literal: not an address ipaddress takes, so refused
        "febf::1",
        "ff0e::1",
        "2001:db8:ffff::1",
        "2001:10::1",  # ORCHID
        "2620:4f:8000::1",
        "5f00::1",
        "::ffff:192.168.1.1",
        "64:ff9b::c0a8:101",
        "2002:c0a8:101::1",
        "2001:0:c0a8:101:8000:63bf:f7f7:f7f7",  # Teredo via a private server address
        "not an address",
        "",
    ],
)
def test_special_purpose_is_denied(host: str) -> None:
    assert not PeerPolicy().allows(host)


def test_allowed_peers_open_a_range_in_any_spelling() -> None:
    policy = PeerPolicy(["100.64.0.0/10", "fd00::/8"])
    assert policy.allows("100.64.1.2")
    assert policy.allows("::ffff:100.64.1.2")
    assert policy.allows("64:ff9b::6440:102")
    assert policy.allows("2002:6440:102::1")
    assert policy.allows("fd12::1")
    assert not policy.allows("10.0.0.1")
    assert not policy.allows("fc00::1")


def test_every_listed_range_is_denied_at_both_ends() -> None:
    policy = PeerPolicy()
    for network in (*DENIED_V4, *DENIED_V6):
        for ip in (network.network_address, network.broadcast_address):
            assert not policy.allows(str(ip)), ip


def test_embedded_v4() -> None:
    v6 = ipaddress.IPv6Address
    assert embedded_v4(v6("2a00::1")) is None
    assert embedded_v4(v6("::ffff:1.2.3.4")) == [ipaddress.IPv4Address("1.2.3.4")]
    assert embedded_v4(v6("64:ff9b::102:304")) == [ipaddress.IPv4Address("1.2.3.4")]
    assert embedded_v4(v6("2002:102:304::")) == [ipaddress.IPv4Address("1.2.3.4")]
    server, client = embedded_v4(v6("2001:0:4136:e378:8000:63bf:fefd:fcfb")) or []
    assert (str(server), str(client)) == ("65.54.227.120", "1.2.3.4")
