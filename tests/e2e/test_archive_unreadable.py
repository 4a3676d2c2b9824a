"""Issue 13, defect 1 (stored side): an archived row that cannot be read back (the ill-formed
stanza earlier servers stored) is set aside, logged once, and never fails or shortens a MAM
page, a room's MAM page or the history a room sends on join. Real server, both stores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from slixmpp import JID

from tests.e2e.harness import TIMEOUT, add_user, clients, next_matching, running_server
from tests.e2e.test_mam import MamClient, mam_query, settle
from tests.e2e.test_muc import PERSISTENT, ROOM, MucClient, create_room, join, live, logged_in
from xmpp_server.modules.mam import Mam, parse_each
from xmpp_server.server import Server


# What a server before the fix archived for <x xmlns='urn:a}b'/>: a name with a '}' in it.
def bad(to: str) -> str:
    return (
        f'<message xmlns="jabber:client" from="mallory@localhost/r" to="{to}" type="chat">'
        '<body>x</body><b}x xmlns="urn:a" /></message>'
    )


def mam_of(server: Server) -> Mam:
    module = server.host.modules["mam"]
    assert isinstance(module, Mam)
    return module


async def plant_bad_row(server: Server, owner: str, stanza_id: str, peer: str) -> None:
    """Write an unreadable row straight into ``owner``'s archive, after everything there."""
    mam = mam_of(server)
    await mam.flushed()
    await server.host.storage.archive.append(
        owner, stanza_id, peer, "in", mam.next_stamp(), bad(owner), "x"
    )


def set_aside_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]


def test_parse_each_reads_the_good_rows_and_names_the_bad_one() -> None:
    good = "<message xmlns='jabber:client' id='a'><body>hi</body></message>"
    parsed = parse_each([good, bad("bob@localhost"), good, "<a/><b/>", ""])
    assert [getattr(p, "tag", None) for p in parsed] == [
        "{jabber:client}message",
        None,
        "{jabber:client}message",
        None,
        None,
    ]
    assert all(isinstance(p, str) and p for p in parsed[1::2] + parsed[4:])


async def test_a_page_with_an_unreadable_row_is_served_full_and_the_row_set_aside(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MamClient(server, a), MamClient(server, b)) as (alice, bob):
            for client in (alice, bob):
                await client.login()
            texts = ["one", "two", "three", "four"]
            for i, text in enumerate(texts):
                if i == 1:
                    await plant_bad_row(server, b, "bad-1", a)
                alice.send_message(mto=b, mbody=text, mtype="chat")
                await next_matching(bob.messages, lambda m, t=text: m["body"] == t)
            await settle(alice)

            # Bob's first page of three holds the bad row: it is skipped and the page re-read.
            answer = await mam_query(bob, rsm={"max": "3"})
            assert answer.bodies == ["one", "two", "three"]
            assert not answer.complete
            assert answer.rsm["count"] == "4"
            after = await mam_query(bob, rsm={"max": "3", "after": answer.rsm["last"]})
            assert after.bodies == ["four"]
            # Alice's archive never had it.
            assert (await mam_query(alice, rsm={"max": "10"})).bodies == texts

            [aside] = await server.host.storage.quarantine.list(b)
            assert (aside.source, aside.xml) == ("archive", bad(b))
            assert "not-well-formed" in aside.reason
            assert len(set_aside_lines(caplog)) == 1  # logged once, not on every query


async def test_room_archive_and_join_history_skip_unreadable_rows(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MucClient(server, a)) as (alice,):
            await alice.login()
            await create_room(alice, ROOM, "alice", {PERSISTENT: "1"})
            for text in ("one", "two"):
                alice.send_message(mto=ROOM, mbody=text, mtype="groupchat")
                await next_matching(alice.messages, live(ROOM, text))
        # Between two runs, the room's archive gets an unreadable newest row.
        await plant_bad_row(server, ROOM, "bad-room-1", f"{ROOM}/mallory")

    async with running_server(migrated_db_url, tmp_path) as server:
        async with clients(MucClient(server, a), MucClient(server, b)) as (alice, bob):
            await logged_in(alice, bob)
            # The room is loaded from storage with its history: the bad row is set aside.
            _, _, _, history = await join(bob, ROOM, "bob", maxstanzas=2)
            assert [m["body"] for m in history] == ["one", "two"]
            await join(alice, ROOM, "alice")

            await plant_bad_row(server, ROOM, "bad-room-2", f"{ROOM}/mallory")
            alice.send_message(mto=ROOM, mbody="three", mtype="groupchat")
            await next_matching(bob.messages, live(ROOM, "three"))
            mam = bob.plugin["xep_0313"]
            answer = await mam.retrieve(jid=JID(ROOM), rsm={"max": 3}, timeout=TIMEOUT)
            bodies = [
                r["mam_result"]["forwarded"]["stanza"]["body"] for r in answer["mam"]["results"]
            ]
            assert bodies == ["one", "two", "three"]

            aside = await server.host.storage.quarantine.list(ROOM)
            assert [q.source for q in aside] == ["archive", "archive"]
            assert len(set_aside_lines(caplog)) == 2
            assert {q.owner for q in aside} == {ROOM}
