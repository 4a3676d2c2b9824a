"""``natterctl room …`` against a running natterd: the MUC module applies each command at once,
so slixmpp occupants (xep_0045) see bans and destruction; rooms made so survive a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import (
    DOMAIN,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)
from xmpp_server.cli import ctl_main

SERVICE = f"conference.{DOMAIN}"
ROOM = f"team@{SERVICE}"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"


class MucClient(Client):
    """A harness client with slixmpp's MUC plugin that keeps every presence it receives (the
    plugin stops raising ``presence`` events for a room it has seen)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_plugin("xep_0045")
        self.room_presences = Mailbox()
        self.register_handler(
            Callback(
                "every presence",
                MatchXPath("{jabber:client}presence"),
                self.room_presences.put_nowait,
            )
        )


def ctl_config(tmp_path: Path, db_url: str) -> Path:
    """natterctl's configuration for the server ``running_server`` starts in ``tmp_path``."""
    path = tmp_path / "natterctl.toml"
    path.write_text(
        f'[server]\ndomain = "{DOMAIN}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[storage]\nurl = "{db_url}"\n'
    )
    return path


async def natterctl(
    capsys: pytest.CaptureFixture[str], config: Path, *args: str, code: int = 0
) -> str:
    """Run the real CLI entry point in a thread (it runs its own event loop); its stdout."""
    got = await asyncio.to_thread(ctl_main, ["--config", str(config), *args])
    captured = capsys.readouterr()
    assert got == code, captured
    return captured.out


def item(presence: Any) -> Any:
    return presence.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}item")


def codes(presence: Any) -> set[str]:
    x = presence.xml.find(f"{{{NS_MUC_USER}}}x")
    if x is None:
        return set()
    return {status.get("code") for status in x.findall(f"{{{NS_MUC_USER}}}status")}


def gone(room: str, nick: str) -> Callable[[Any], bool]:
    """The room's unavailable presence for ``nick``."""
    return lambda p: p["from"] == f"{room}/{nick}" and p["type"] == "unavailable"


async def enter(client: MucClient, room: str, nick: str) -> Any:
    """Send a join presence; the self-presence (status 110) or the error presence."""
    client.plugin["xep_0045"].make_join_stanza(JID(room), nick).send()

    def answer(p: Any) -> bool:
        if p["from"] != f"{room}/{nick}":
            return False
        return bool(p["type"] == "error" or ("110" in codes(p) and p["type"] != "unavailable"))

    return await next_matching(client.room_presences, answer)


async def test_create_then_join_list_show_and_ban(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ctl_config(tmp_path, migrated_db_url)
    async with running_server(migrated_db_url, tmp_path) as server:
        alice, bob = await add_user(server, "alice"), await add_user(server, "bob")
        out = await natterctl(
            capsys, config, "room", "create", "team", "--owner", alice, "--name", "Team"
        )
        assert out == f"created room {ROOM} (owners: {alice})\n"
        b, a = MucClient(server, f"{bob}/laptop"), MucClient(server, alice)
        async with clients(b, a):
            await b.login()
            await a.login()
            # Configured already: no "201 created, waiting for configuration", just open.
            joined = await enter(b, ROOM, "bob")
            assert joined["type"] != "error", joined
            assert "201" not in codes(joined)
            assert (item(joined).get("affiliation"), item(joined).get("role")) == (
                "none",
                "participant",
            )
            # A room alice made by joining is in memory only (and locked until configured).
            made = await enter(a, f"scratch@{SERVICE}", "alice")
            assert "201" in codes(made), made

            out = await natterctl(capsys, config, "room", "list")
            assert out == (
                f"scratch@{SERVICE}  temporary, locked, public  1 occupant\n"
                f"{ROOM}  persistent, public  1 occupant  name: Team\n"
            )
            out = await natterctl(capsys, config, "room", "show", "team")
            assert out.endswith(
                f"affiliations: 1 owner\noccupants: 1\n  bob  {bob}  participant, none\n"
            ), out

            out = await natterctl(
                capsys, config, "room", "affiliate", "team", bob, "outcast", "--reason", "spam"
            )
            assert out == (
                f"{bob} is now outcast in {ROOM} (was none)\nremoved from the room: bob\n"
            )
            # XEP-0045 §9.1: the banned occupant is removed at once, with status 301.
            banned = await next_matching(b.room_presences, gone(ROOM, "bob"))
            assert {"301", "110"} <= codes(banned), banned
            assert item(banned).get("affiliation") == "outcast"
            assert item(banned).findtext(f"{{{NS_MUC_USER}}}reason") == "spam"
            refused = await enter(b, ROOM, "bob")
            assert refused["type"] == "error"
            assert refused["error"]["condition"] == "forbidden"

            out = await natterctl(capsys, config, "room", "members", ROOM)
            assert out == f"{alice}  owner\n{bob}  outcast  reason: spam\n"
            # Stored as well: the room is persistent.
            stored = await server.host.storage.rooms.affiliations(ROOM)
            assert [(s.jid, s.affiliation, s.reason) for s in stored] == [
                (bob, "outcast", "spam"),
                (alice, "owner", None),
            ]


async def test_last_owner_and_errors_live(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ctl_config(tmp_path, migrated_db_url)
    async with running_server(migrated_db_url, tmp_path):
        await natterctl(capsys, config, "room", "create", "team", "--owner", "alice@localhost")
        for args, code, message in (
            (("create", "team"), 1, f"room {ROOM} exists already"),
            (
                ("affiliate", "team", "alice@localhost", "member"),
                1,
                f"alice@localhost is the last owner of {ROOM}; make another owner first",
            ),
            (("delete", "nowhere"), 1, f"no room nowhere@{SERVICE}"),
            (
                ("show", "team@elsewhere.example"),
                2,
                "room 'team@elsewhere.example' is not on this server's MUC service"
                f" {SERVICE} (set [modules.muc] host to manage another)",
            ),
        ):
            got = await asyncio.to_thread(ctl_main, ["--config", str(config), "room", *args])
            assert got == code
            assert capsys.readouterr().err == f"natterctl: {message}\n"


async def test_delete_tells_the_occupants(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ctl_config(tmp_path, migrated_db_url)
    async with running_server(migrated_db_url, tmp_path) as server:
        alice, bob = await add_user(server, "alice"), await add_user(server, "bob")
        await natterctl(capsys, config, "room", "create", "team", "--owner", alice)
        async with clients(MucClient(server, alice), MucClient(server, bob)) as (a, b):
            for client, nick in ((a, "alice"), (b, "bob")):
                await client.login()
                assert (await enter(client, ROOM, nick))["type"] != "error"
            out = await natterctl(capsys, config, "room", "delete", "team", "--reason", "moving")
            assert out == f"deleted room {ROOM} (2 occupants told)\n"
            # §10.9: each occupant gets its unavailable presence with <destroy/>.
            for client, nick in ((a, "alice"), (b, "bob")):
                left = await next_matching(client.room_presences, gone(ROOM, nick))
                destroy = left.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}destroy")
                assert destroy is not None, left
                assert destroy.findtext(f"{{{NS_MUC_USER}}}reason") == "moving"
            assert await server.host.storage.rooms.get(ROOM) is None
            assert await natterctl(capsys, config, "room", "list") == ""


async def test_created_room_survives_a_restart(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ctl_config(tmp_path, migrated_db_url)
    async with running_server(migrated_db_url, tmp_path) as server:
        alice, bob = await add_user(server, "alice"), await add_user(server, "bob")
        carol = await add_user(server, "carol")
        await natterctl(
            capsys, config, "room", "create", "team", "--owner", alice, "--members-only"
        )
        await natterctl(capsys, config, "room", "affiliate", "team", bob, "member")

    # natterd is down: natterctl reads the database.
    line = f"{ROOM}  persistent, public, members-only\n"
    assert await natterctl(capsys, config, "room", "list") == line

    async with running_server(migrated_db_url, tmp_path) as server:
        async with clients(MucClient(server, bob), MucClient(server, carol)) as (b, c):
            await b.login()
            await c.login()
            joined = await enter(b, ROOM, "bob")
            assert joined["type"] != "error", joined
            assert item(joined).get("affiliation") == "member"
            refused = await enter(c, ROOM, "carol")
            assert refused["error"]["condition"] == "registration-required"
            out = await natterctl(capsys, config, "room", "list")
            assert out == f"{ROOM}  persistent, public, members-only  1 occupant\n"
            out = await natterctl(capsys, config, "room", "members", "team")
            assert out == f"{alice}  owner\n{bob}  member\n"
