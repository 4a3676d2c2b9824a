"""Defect 8 of issue 13: caps on what one user or one address may make the server hold.

Connections per address, accounts created in-band (per address and in total), roster
items, roster items for accounts that do not exist, rooms per user, and nothing left
behind by a refused room creation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import slixmpp.exceptions

from tests.e2e.harness import (
    HEADER,
    Client,
    RawClient,
    add_user,
    clients,
    next_matching,
    running_server,
)
from tests.e2e.sources import FromSource, needs_loopback_aliases
from tests.e2e.test_register import Registrant
from xmpp_server.config import build_config
from xmpp_server.modules.muc.service import Muc

ROOMS = "conference.localhost"


def test_defaults_a_public_server_can_live_with(tmp_path: Path) -> None:
    config = build_config({"server": {"data_dir": str(tmp_path)}}, base_dir=tmp_path)
    assert config.c2s.max_connections_per_ip == 100


# -- connections per address ---------------------------------------------------------------


async def open_stream(port: int, source: str = "127.0.0.1") -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    raw = RawClient(reader, writer)
    await raw.send(HEADER)
    await raw.read_until(b"</stream:features>")
    return raw


@needs_loopback_aliases
async def test_connections_per_address_are_capped(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"c2s": {"max_connections_per_ip": 3}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        port = server.c2s_port
        held = [await open_stream(port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = RawClient(reader, writer)
        data = await extra.read_to_eof()  # refused at once, without sending anything
        assert b"<policy-violation" in data and b"</stream:stream>" in data
        extra.close()
        # Another address is not affected; a freed slot can be used again.
        other = await open_stream(port, "127.0.0.2")
        held.pop().close()
        for _ in range(100):
            if sum(server._per_ip.values()) == 3:
                break
            await asyncio.sleep(0.05)
        held.append(await open_stream(port))
        assert server._per_ip == {"127.0.0.1": 3, "127.0.0.2": 1}
        for raw in [*held, other]:
            raw.close()


# -- in-band registration in total ---------------------------------------------------------


class SourcedRegistrant(FromSource, Registrant):
    def __init__(self, server: Any, jid: str, source: str) -> None:
        super().__init__(server, jid)
        self.source = source


async def register(server: Any, user: str, source: str) -> Any:
    async with clients(SourcedRegistrant(server, f"{user}@localhost", source)) as (client,):
        client.start()
        async with asyncio.timeout(15):
            while not client.results:
                await asyncio.sleep(0.05)
        return client.results[0]


@needs_loopback_aliases
async def test_registration_is_capped_in_total(migrated_db_url: str, tmp_path: Path) -> None:
    register_options = {"enabled": True, "max_per_ip": 5, "max_total": 2}
    overrides = {"modules": {"register": register_options}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        assert (await register(server, "one", "127.0.0.2"))["type"] == "result"
        assert (await register(server, "two", "127.0.0.3"))["type"] == "result"
        refused = await register(server, "three", "127.0.0.4")
        assert refused["type"] == "error"
        assert refused["error"]["condition"] == "resource-constraint"
        assert not await server.host.storage.accounts.exists("three@localhost")


# -- rosters -------------------------------------------------------------------------------


async def test_roster_items_are_capped(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"roster": {"max_items": 3}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
            for i in range(3):
                await alice.update_roster(f"friend{i}@localhost", name=f"f{i}")
            # Changing an existing item is fine when full; a fourth item is not.
            await alice.update_roster("friend0@localhost", name="renamed")
            try:
                await alice.update_roster("friend3@localhost")
            except slixmpp.exceptions.IqError as exc:
                assert exc.iq["error"]["condition"] == "not-allowed"
            else:
                raise AssertionError("a fourth roster item was accepted")
            # A subscription request to a real account is refused too.
            await add_user(server, "bob")
            since = len(alice.presences.items)
            alice.send_presence(pto="bob@localhost", ptype="subscribe")
            error = await next_matching(
                alice.presences, lambda p: p["type"] == "error", since=since
            )
            assert error["error"]["condition"] == "not-allowed"
            assert await server.host.storage.rosters.count(jid) == 3


async def test_subscribe_to_nonexistent_account_adds_no_item(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
            alice.send_presence(pto="ghost@localhost", ptype="subscribe")
            refusal = await next_matching(
                alice.presences, lambda p: p["from"].bare == "ghost@localhost"
            )
            assert refusal["type"] == "unsubscribed"
            assert await server.host.storage.rosters.get(jid, "ghost@localhost") is None
            assert await server.host.storage.rosters.items(jid) == []
            # Pre-approving a name nobody has adds nothing either.
            alice.send_presence(pto="phantom@localhost", ptype="subscribed")
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)  # processed by now
            assert await server.host.storage.rosters.items(jid) == []


# -- rooms ---------------------------------------------------------------------------------


async def enter(client: Client, room: str) -> Any:
    """Join (creating) ``room``; the room's answer to us: our own presence or an error."""
    since = len(client.presences.items)
    client.send_presence(pto=f"{room}@{ROOMS}/{client.boundjid.user}")
    return await next_matching(
        client.presences, lambda p: p["from"].bare == f"{room}@{ROOMS}", since=since
    )


async def test_rooms_per_user_are_capped_and_refusals_keep_nothing(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"muc": {"max_rooms_per_user": 3, "admins": ["root@localhost"]}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        muc = server.host.modules["muc"]
        assert isinstance(muc, Muc)
        jid = await add_user(server, "alice")
        bob = await add_user(server, "bob")
        root = await add_user(server, "root")
        async with clients(Client(server, jid), Client(server, bob), Client(server, root)) as (
            alice,
            b,
            r,
        ):
            for client in (alice, b, r):
                await client.login()
            for i in range(3):
                assert (await enter(alice, f"room{i}"))["type"] != "error"
            for i in range(3, 20):
                refused = await enter(alice, f"room{i}")
                assert refused["type"] == "error"
                assert refused["error"]["condition"] == "not-allowed"
            assert sorted(str(j.local) for j in muc.rooms) == ["room0", "room1", "room2"]
            # Others may still create rooms, and join alice's; an admin is not capped.
            assert (await enter(b, "bobs"))["type"] != "error"
            assert (await enter(b, "room0"))["type"] != "error"
            for i in range(4):
                assert (await enter(r, f"admin{i}"))["type"] != "error"
            await alice.close()
            # Alice is gone: her temporary rooms go with her, but room0 still has bob.
            for _ in range(100):
                if len(muc.rooms) == 6:
                    break
                await asyncio.sleep(0.05)
            assert sorted(str(j.local) for j in muc.rooms) == [
                "admin0",
                "admin1",
                "admin2",
                "admin3",
                "bobs",
                "room0",
            ]
        for _ in range(100):
            if not muc.rooms and not muc._outboxes:
                break
            await asyncio.sleep(0.05)
        assert muc.rooms == {} and muc._outboxes == {}
