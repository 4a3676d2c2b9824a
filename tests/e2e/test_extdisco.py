"""XEP-0215 external service discovery through a real client, and its TURN credentials used on
the built-in TURN server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib.util
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from stun.credentials import turn_credentials
from tests.e2e.harness import (
    Client,
    add_user,
    clients,
    free_udp_tcp_port,
    running_server,
    running_server_on_free_ports,
)
from xmpp_server.config import ConfigError, build_config
from xmpp_server.modules import validate_module_options
from xmpp_server.modules.extdisco import ExtDisco, ExtDiscoOptions

NS = "urn:xmpp:extdisco:2"
SECRET = "extdisco test secret"
TTL = 3600


def stun_overrides(**extra: Any) -> dict[str, dict[str, Any]]:
    """[stun] on a port free now; ``extra`` values that are callables are called (a port
    picked anew at each start, e.g. ``tls_port=free_udp_tcp_port``)."""
    port = free_udp_tcp_port()
    stun = {
        "enabled": True,
        "host": ["127.0.0.1"],
        "udp_port": port,
        "tcp_port": port,
        "tls_port": 0,
        "secret": SECRET,
        "credential_ttl": TTL,
        "relay_host": "127.0.0.1",
        "allowed_peers": ["127.0.0.0/8"],
    }
    stun.update({key: value() if callable(value) else value for key, value in extra.items()})
    return {"stun": stun}


async def query(
    client: Client, tag: str, attrs: dict[str, str] | None = None, *children: Any
) -> Any:
    iq = client.Iq()
    iq["type"] = "get"
    iq["to"] = "localhost"
    request = ET.Element(f"{{{NS}}}{tag}", attrs or {})
    request.extend(children)
    iq.xml.append(request)
    reply = await iq.send(timeout=10)
    found = reply.xml.find(f"{{{NS}}}{tag}")
    assert found is not None, ET.tostring(reply.xml)
    return found


def services(element: Any) -> list[dict[str, str]]:
    return [dict(s.attrib) for s in element.findall(f"{{{NS}}}service")]


def expected_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_credential(
    service: dict[str, str], user: str, secret: str, ttl: int, asked: float
) -> None:
    """The coturn use-auth-secret scheme, recomputed here independently of stun.credentials."""
    expiry_text, who = service["username"].split(":", 1)
    assert who == user
    expiry = int(expiry_text)
    assert int(asked) + ttl <= expiry <= int(time.time()) + ttl
    assert service["password"] == expected_password(secret, service["username"])
    expires = datetime.strptime(service["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expires.timestamp() == expiry
    assert service["restricted"] in ("1", "true")


async def test_services_with_fresh_turn_credentials(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = partial(stun_overrides, tls_port=free_udp_tcp_port)
    async with running_server_on_free_ports(migrated_db_url, tmp_path, overrides) as server:
        port, tls_port = server.host.config.stun.udp_port, server.host.config.stun.tls_port
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            for client in (alice, bob):
                await client.login(presence=False)
            info = await alice.plugin["xep_0030"].get_info(jid="localhost")
            assert NS in set(info["disco_info"]["features"])

            asked = time.time()
            listed = services(await query(alice, "services"))
            plain = [
                {k: v for k, v in s.items() if k in ("type", "host", "port", "transport")}
                for s in listed
            ]
            assert plain == [
                {"type": "stun", "host": "127.0.0.1", "port": str(port), "transport": "udp"},
                {"type": "stun", "host": "127.0.0.1", "port": str(port), "transport": "tcp"},
                {"type": "turn", "host": "127.0.0.1", "port": str(port), "transport": "udp"},
                {"type": "turn", "host": "127.0.0.1", "port": str(port), "transport": "tcp"},
                {"type": "turns", "host": "127.0.0.1", "port": str(tls_port), "transport": "tcp"},
            ]
            for service in listed:
                if service["type"] == "stun":
                    assert not {"username", "password", "restricted"} & set(service)
                else:
                    check_credential(service, a, SECRET, TTL, asked)

            # Credentials are the requester's own: bob's name his JID, not alice's.
            turn = services(await query(bob, "services", {"type": "turn"}))
            assert [s["transport"] for s in turn] == ["udp", "tcp"]
            for service in turn:
                check_credential(service, b, SECRET, TTL, asked)

            # <credentials/> for one service; an unknown one is item-not-found.
            one = {"type": "turn", "host": "127.0.0.1", "port": str(port)}
            creds = services(
                await query(alice, "credentials", {}, ET.Element(f"{{{NS}}}service", one))
            )
            assert [s["transport"] for s in creds] == ["udp", "tcp"]
            for service in creds:
                check_credential(service, a, SECRET, TTL, asked)
            unknown = ET.Element(f"{{{NS}}}service", {"type": "turn", "host": "elsewhere.example"})
            with pytest.raises(IqError) as refused:
                await query(alice, "credentials", {}, unknown)
            assert refused.value.iq["error"]["condition"] == "item-not-found"
            with pytest.raises(IqError) as refused:
                await query(alice, "credentials")
            assert refused.value.iq["error"]["condition"] == "bad-request"


async def test_public_host_and_generated_secret(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = partial(
        stun_overrides, secret="", public_host="turn.example.org", tcp_port=0, turn=True
    )
    async with running_server_on_free_ports(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login(presence=False)
            asked = time.time()
            listed = services(await query(alice, "services"))
            assert [(s["type"], s["host"], s["transport"]) for s in listed] == [
                ("stun", "turn.example.org", "udp"),
                ("turn", "turn.example.org", "udp"),
            ]
            secret = (tmp_path / "data" / "turn.secret").read_text().strip()
            check_credential(listed[1], a, secret, TTL, asked)


async def test_configured_services_without_builtin_server(
    migrated_db_url: str, tmp_path: Path
) -> None:
    external = [
        {"type": "stun", "host": "stun.example.org", "port": 3478},
        {
            "type": "turns",
            "host": "turn.example.org",
            "port": 443,
            "transport": "tcp",
            "restricted": True,
        },
    ]
    overrides: dict[str, dict[str, Any]] = {
        "modules": {"extdisco": {"services": external}},
        "stun": {"secret": SECRET, "credential_ttl": 600},
    }
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login(presence=False)
            asked = time.time()
            listed = services(await query(alice, "services"))
            assert listed[0] == {
                "type": "stun",
                "host": "stun.example.org",
                "port": "3478",
                "transport": "udp",
            }
            assert (listed[1]["type"], listed[1]["port"], listed[1]["transport"]) == (
                "turns",
                "443",
                "tcp",
            )
            check_credential(listed[1], a, SECRET, 600, asked)
            assert services(await query(alice, "services", {"type": "turn"})) == []


async def test_nothing_to_offer_is_an_empty_list(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login(presence=False)
            assert services(await query(alice, "services")) == []
            assert not (tmp_path / "data" / "turn.secret").exists()


def test_wildcard_listener_is_advertised_under_the_domain(tmp_path: Path) -> None:
    """Listening on 0.0.0.0 or :: tells clients nothing: the XMPP domain names the machine."""
    for hosts in (["0.0.0.0"], ["::", "0.0.0.0"]):
        stun = {"enabled": True, "host": hosts, "tcp_port": 0, "tls_port": 0, "turn": False}
        data = {"server": {"domain": "example.org"}, "stun": stun}
        config = build_config(data, base_dir=tmp_path)
        module = ExtDisco(SimpleNamespace(config=config, domain="example.org"), ExtDiscoOptions())
        assert [(s.type, s.host, s.port) for s in module.services()] == [
            ("stun", "example.org", 3478)
        ]


def test_bad_service_options_are_rejected(tmp_path: Path) -> None:
    bad = [
        ({"type": "relay", "host": "x"}, "modules.extdisco.services[0].type"),
        ({"type": "turn"}, "modules.extdisco.services[0].host"),
        ({"type": "turn", "host": "x", "port": 0}, "modules.extdisco.services[0].port"),
        (
            {"type": "turn", "host": "x", "transport": "sctp"},
            "modules.extdisco.services[0].transport",
        ),
    ]
    for service, key in bad:
        config = build_config({"modules": {"extdisco": {"services": [service]}}}, base_dir=tmp_path)
        with pytest.raises(ConfigError) as error:
            validate_module_options(config)
        assert error.value.key == key


# --------------------------------------------------------------------------------------------
# The credentials handed out work on the built-in TURN server (and nothing else does).

needs_turn = pytest.mark.skipif(
    importlib.util.find_spec("stun.turn") is None,
    reason="the TURN server (stun/turn.py) is not there yet",
)


class Peer(asyncio.DatagramProtocol):
    """A plain UDP endpoint: what the relay forwards to, and answers through it."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))


@contextlib.contextmanager
def closing(transport: asyncio.BaseTransport) -> Iterator[None]:
    try:
        yield
    finally:
        transport.close()


@needs_turn
async def test_xep0215_credentials_allocate_on_the_turn_server(
    migrated_db_url: str, tmp_path: Path
) -> None:
    from aioice import stun as aioice_stun
    from aioice.turn import create_turn_endpoint

    loop = asyncio.get_running_loop()
    async with running_server_on_free_ports(migrated_db_url, tmp_path, stun_overrides) as server:
        server_addr = ("127.0.0.1", server.host.config.stun.udp_port)
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login(presence=False)
            turn = services(await query(alice, "services", {"type": "turn"}))
            udp = next(s for s in turn if s["transport"] == "udp")
            assert (udp["host"], int(udp["port"])) == server_addr

        # A relay with the handed-out credential carries data both ways.
        peer_transport, peer = await loop.create_datagram_endpoint(
            Peer, local_addr=("127.0.0.1", 0)
        )
        with closing(peer_transport):
            peer_addr = peer_transport.get_extra_info("sockname")
            relay, client = await asyncio.wait_for(
                create_turn_endpoint(Peer, server_addr, udp["username"], udp["password"]), 10
            )
            try:
                relayed = relay.get_extra_info("sockname")
                assert relayed[0] == "127.0.0.1"
                relay.sendto(b"through the relay", peer_addr)
                data, source = await asyncio.wait_for(peer.received.get(), 10)
                assert (data, source) == (b"through the relay", tuple(relayed))
                peer_transport.sendto(b"and back", source)
                data, source = await asyncio.wait_for(client.received.get(), 10)
                assert (data, source) == (b"and back", peer_addr)
            finally:
                relay.close()

        # An expired credential and a forged password are both refused with 401.
        user = udp["username"].split(":", 1)[1]
        expired = turn_credentials(SECRET, user, TTL, time.time() - 2 * TTL)
        forged = (udp["username"], expected_password("not the secret", udp["username"]))
        for username, password in (expired, forged):
            with pytest.raises(aioice_stun.TransactionFailed) as refused:
                await asyncio.wait_for(
                    create_turn_endpoint(Peer, server_addr, username, password), 10
                )
            assert refused.value.response.attributes["ERROR-CODE"][0] == 401
