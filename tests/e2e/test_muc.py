"""XEP-0045 Multi-User Chat on conference.localhost, driven by slixmpp's MUC client (xep_0045)
with MAM (xep_0313), data forms (xep_0004) and MUC self-ping (xep_0410), on both backends."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID
from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0410 import PingStatus
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import (
    DOMAIN,
    TIMEOUT,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)

SERVICE = f"conference.{DOMAIN}"
ROOM = f"team@{SERVICE}"
NS_MUC = "http://jabber.org/protocol/muc"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_ROOMCONFIG = "http://jabber.org/protocol/muc#roomconfig"
NS_MAM = "urn:xmpp:mam:2"
NS_SID = "urn:xmpp:sid:0"

PERSISTENT = "muc#roomconfig_persistentroom"
MEMBERS_ONLY = "muc#roomconfig_membersonly"
PASSWORD_PROTECTED = "muc#roomconfig_passwordprotectedroom"
SECRET = "muc#roomconfig_roomsecret"
PUBLIC = "muc#roomconfig_publicroom"
WHOIS = "muc#roomconfig_whois"
NAME = "muc#roomconfig_roomname"


class MucClient(Client):
    """A harness client with the MUC, MAM, forms and self-ping plugins, which also keeps every
    presence it receives: slixmpp stops raising ``presence`` events for a room once its MUC
    plugin has seen the room (it sets ``ignore_updates`` on the room's roster entry)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for plugin in ("xep_0004", "xep_0045", "xep_0313", "xep_0410"):
            self.register_plugin(plugin)
        self.room_presences = Mailbox()
        self.register_handler(
            Callback(
                "every presence",
                MatchXPath("{jabber:client}presence"),
                self.room_presences.put_nowait,
            )
        )
        # ``messages`` has only those with a body: not subject changes.
        self.all_messages = Mailbox()
        self.register_handler(
            Callback(
                "every message",
                MatchXPath("{jabber:client}message"),
                self.all_messages.put_nowait,
            )
        )

    @property
    def muc(self) -> Any:
        return self.plugin["xep_0045"]


# ── helpers ──


def occupant(room: str, nick: str) -> str:
    return f"{room}/{nick}"


def codes(stanza: Any) -> set[int]:
    x = stanza.get_plugin("muc", check=True)
    return set() if x is None else set(x["status_codes"])


def is_available(presence: Any) -> bool:
    return presence["type"] in ("available", *presence.showtypes)


def presence_from(
    room: str, nick: str, *, available: bool = True, code: int | None = None
) -> Callable[[Any], bool]:
    def match(p: Any) -> bool:
        if p["from"] != occupant(room, nick):
            return False
        if (is_available(p) if available else p["type"] == "unavailable") is False:
            return False
        return code is None or code in codes(p)

    return match


def live(room: str, body: str) -> Callable[[Any], bool]:
    """A groupchat message of the room with ``body``, not a history copy."""

    def match(m: Any) -> bool:
        return bool(
            m["type"] == "groupchat"
            and m["from"].bare == room
            and m["body"] == body
            and m.xml.find("{urn:xmpp:delay}delay") is None
        )

    return match


async def enter(
    client: MucClient,
    room: str,
    nick: str,
    *,
    password: str | None = None,
    maxstanzas: int | None = None,
) -> Any:
    """Send a join presence; the self-presence (status 110) or the error presence."""
    since = len(client.room_presences.items)
    client.muc.make_join_stanza(JID(room), nick, password=password, maxstanzas=maxstanzas).send()

    def answer(p: Any) -> bool:
        if p["from"] != occupant(room, nick):
            return False
        return bool(p["type"] == "error" or (110 in codes(p) and p["type"] != "unavailable"))

    return await next_matching(client.room_presences, answer, since=since)


async def refused(client: MucClient, room: str, nick: str, *, password: str | None = None) -> str:
    """The error condition of a join that must fail."""
    presence = await enter(client, room, nick, password=password)
    assert presence["type"] == "error", f"{client.boundjid} entered {room}: {presence}"
    return str(presence["error"]["condition"])


async def join(client: MucClient, room: str, nick: str, **kwargs: Any) -> Any:
    """slixmpp's own join: waits for the self-presence, then for the subject (XEP-0045
    §7.2.15); returns (self-presence, subject message, occupants, history)."""
    return await client.muc.join_muc_wait(room, nick, timeout=TIMEOUT, **kwargs)


async def leave(client: MucClient, room: str, nick: str) -> Any:
    """Exit (XEP-0045 §7.14) and return the room's unavailable self-presence."""
    client.send_presence(pto=occupant(room, nick), ptype="unavailable")
    client.muc.rooms[None].pop(room, None)
    return await next_matching(
        client.room_presences, presence_from(room, nick, available=False, code=110)
    )


async def configure(owner: MucClient, room: str, fields: dict[str, str] | None = None) -> None:
    """Submit the owner's configuration form: empty accepts the defaults (instant room)."""
    form = owner.plugin["xep_0004"].make_form(ftype="submit")
    if fields:
        form.add_field(var="FORM_TYPE", ftype="hidden", value=NS_ROOMCONFIG)
        for var, value in fields.items():
            form.add_field(var=var, value=value)
    await owner.muc.set_room_config(room, form, timeout=TIMEOUT)


async def create_room(
    owner: MucClient, room: str, nick: str, fields: dict[str, str] | None = None
) -> Any:
    """Create ``room`` (XEP-0045 §10.1) as its owner and unlock it with ``fields``."""
    presence = await enter(owner, room, nick)
    assert presence["type"] != "error", presence
    assert {110, 201} <= codes(presence), presence
    assert (presence["muc"]["affiliation"], presence["muc"]["role"]) == ("owner", "moderator")
    await configure(owner, room, fields)
    return presence


@contextlib.asynccontextmanager
async def online(
    server: Any, *names: str
) -> AsyncIterator[tuple[tuple[str, ...], tuple[MucClient, ...]]]:
    """Users ``names`` on ``server``, logged in with MUC clients: (their JIDs, their clients)."""
    jids = tuple([await add_user(server, name) for name in names])
    async with clients(*(MucClient(server, jid) for jid in jids)) as items:
        await logged_in(*items)
        yield jids, items


async def affiliated(client: MucClient, room: str, affiliation: str) -> list[str]:
    """The bare JIDs on a room's affiliation list, sorted (XEP-0045 §9.5, §10.5)."""
    items = await client.muc.get_affiliation_list(room, affiliation, timeout=TIMEOUT)
    return sorted(JID(j).bare for j in items)


async def iq_error(coro: Any) -> str:
    with pytest.raises(IqError) as caught:
        await coro
    return str(caught.value.iq["error"]["condition"])


async def room_info(client: MucClient, jid: str) -> Any:
    return await client.plugin["xep_0030"].get_info(jid=jid, timeout=TIMEOUT)


async def settle(client: MucClient) -> None:
    """Wait until the server has handled everything the client sent before."""
    await client.plugin["xep_0199"].ping(DOMAIN, timeout=TIMEOUT)


async def logged_in(*items: MucClient) -> None:
    for client in items:
        await client.login()


def truthy(value: Any) -> bool:
    return value is True or value in ("1", "true")


def stanza_id(message: Any, by: str) -> str | None:
    for element in message.xml.findall(f"{{{NS_SID}}}stanza-id"):
        if element.get("by") == by:
            return str(element.get("id"))
    return None


# ── creating, chatting, presence, nicks ──


async def test_three_occupants_chat_see_each_other_and_one_changes_nick(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jids = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        async with clients(*(MucClient(server, jid) for jid in jids)) as (alice, bob, carol):
            await logged_in(alice, bob, carol)
            await create_room(alice, ROOM, "alice", {WHOIS: "anyone", PERSISTENT: "0"})

            own, subject, _, history = await join(bob, ROOM, "bob")
            assert {110, 100} <= codes(own)  # 100: the room is non-anonymous (§7.2.4)
            assert (own["muc"]["affiliation"], own["muc"]["role"]) == ("none", "participant")
            assert subject["from"] == ROOM and history == []
            seen = await next_matching(alice.room_presences, presence_from(ROOM, "bob"))
            assert seen["muc"]["role"] == "participant"
            assert seen["muc"]["jid"] == bob.boundjid  # whois=anyone: everyone sees real JIDs

            await join(carol, ROOM, "carol")
            # Existing occupants' presence first, the self-presence last (§7.2.3).
            order = [
                p["from"].resource for p in carol.room_presences.items if p["from"].bare == ROOM
            ]
            assert order.index("alice") < order.index("carol")
            assert order.index("bob") < order.index("carol")
            for client in (alice, bob):
                await next_matching(client.room_presences, presence_from(ROOM, "carol"))

            everyone = (alice, bob, carol)
            lines = {"alice": "hello all", "bob": "hi alice", "carol": "hey both"}
            for sender, (nick, text) in zip(everyone, lines.items(), strict=True):
                sender.send_message(mto=ROOM, mbody=text, mtype="groupchat")
                for client in everyone:
                    got = await next_matching(client.messages, live(ROOM, text))
                    assert got["from"] == occupant(ROOM, nick)
            # Everything before the marker has arrived once the marker has.
            marker = alice.make_message(mto=ROOM, mbody="marker", mtype="groupchat")
            marker["id"] = "marker-1"
            marker.send()
            for client in everyone:
                reflected = await next_matching(client.messages, live(ROOM, "marker"))
                assert reflected["id"] == "marker-1"  # the sender recognises its own message
                for text in lines.values():
                    copies = [m for m in client.messages.items if live(ROOM, text)(m)]
                    assert len(copies) == 1, (client.boundjid, text, copies)

            # Carol becomes Caroline (§7.6): unavailable with 303 and the new nick, then
            # available under the new nick.
            new_nick = await carol.muc.set_self_nick(ROOM, "caroline", timeout=TIMEOUT)
            assert new_nick == "caroline"
            for client in (alice, bob):
                gone = await next_matching(
                    client.room_presences, presence_from(ROOM, "carol", available=False, code=303)
                )
                assert gone["muc"]["item_nick"] == "caroline"
                back = await next_matching(client.room_presences, presence_from(ROOM, "caroline"))
                items = client.room_presences.items
                assert items.index(gone) < items.index(back)
            carol.send_message(mto=ROOM, mbody="new name", mtype="groupchat")
            for client in everyone:
                got = await next_matching(client.messages, live(ROOM, "new name"))
                assert got["from"] == occupant(ROOM, "caroline")

            # Bob leaves (§7.14): he gets his own unavailable presence, the others see it.
            exit_presence = await leave(bob, ROOM, "bob")
            assert exit_presence["muc"]["role"] == "none"
            for client in (alice, carol):
                await next_matching(
                    client.room_presences, presence_from(ROOM, "bob", available=False)
                )


async def test_room_is_locked_until_the_owner_configures_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            created = await enter(alice, ROOM, "alice")
            assert {110, 201} <= codes(created)
            assert await refused(bob, ROOM, "bob") == "item-not-found"  # §10.1.1
            form = await alice.muc.get_room_config(ROOM, timeout=TIMEOUT)
            fields = form.get_fields()
            for var in (PERSISTENT, MEMBERS_ONLY, PUBLIC, WHOIS, NAME):
                assert var in fields, f"{var} missing from the configuration form"
            await configure(alice, ROOM, {NAME: "The Team"})
            await join(bob, ROOM, "bob")
            info = await room_info(bob, ROOM)
            names = {identity[3] for identity in info["disco_info"]["identities"]}
            assert "The Team" in names
            values = (await alice.muc.get_room_config(ROOM, timeout=TIMEOUT)).get_values()
            assert values[NAME] == "The Team"
            assert not truthy(values[PERSISTENT])


async def test_temporary_room_goes_away_with_its_last_occupant_and_persistent_stays(
    migrated_db_url: str, tmp_path: Path
) -> None:
    kept = f"kept@{SERVICE}"
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(MucClient(server, a)) as (alice,):
            await alice.login()
            await create_room(alice, ROOM, "alice")  # instant room: defaults, temporary
            await create_room(alice, kept, "alice", {PERSISTENT: "1"})
            await leave(alice, ROOM, "alice")
            await leave(alice, kept, "alice")
            assert await iq_error(room_info(alice, ROOM)) == "item-not-found"
            features = (await room_info(alice, kept))["disco_info"]["features"]
            assert "muc_persistent" in features
            # Made temporary again, it goes with its last occupant.
            await join(alice, kept, "alice")
            await configure(alice, kept, {PERSISTENT: "0"})
            await leave(alice, kept, "alice")
            assert await iq_error(room_info(alice, kept)) == "item-not-found"


async def test_presence_without_muc_element_creates_an_instant_room(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """§10.1.1: an old groupchat 1.0 client's plain presence makes an unlocked room."""
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            alice.send_presence(pto=occupant(ROOM, "alice"))
            own = await next_matching(alice.room_presences, presence_from(ROOM, "alice", code=110))
            assert own["muc"]["affiliation"] == "owner"
            await join(bob, ROOM, "bob")  # no configuration step was needed


# ── access control ──


async def test_members_only_room_refuses_non_members(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice", {MEMBERS_ONLY: "1"})
            assert await refused(bob, ROOM, "bob") == "registration-required"  # §7.2.7
            await alice.muc.set_affiliation(ROOM, "member", jid=c, timeout=TIMEOUT)
            own, *_ = await join(carol, ROOM, "carol")
            assert own["muc"]["affiliation"] == "member"
            assert await affiliated(alice, ROOM, "member") == [c]
            features = (await room_info(alice, ROOM))["disco_info"]["features"]
            assert "muc_membersonly" in features


async def test_outcast_is_refused_and_a_present_one_is_removed(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "mallory") as ((a, b, m), (alice, bob, mallory)):
            await create_room(alice, ROOM, "alice")
            await join(mallory, ROOM, "mallory")
            await join(bob, ROOM, "bob")
            await alice.muc.set_affiliation(ROOM, "outcast", jid=m, reason="spam", timeout=TIMEOUT)
            # A banned occupant is removed with status 301 (§9.1), seen by everyone.
            for client in (mallory, alice, bob):
                await next_matching(
                    client.room_presences,
                    presence_from(ROOM, "mallory", available=False, code=301),
                )
            assert await refused(mallory, ROOM, "mallory") == "forbidden"  # §7.2.8
            assert await affiliated(alice, ROOM, "outcast") == [m]
            # Lifting the ban (affiliation none) lets her in again (§9.2).
            await alice.muc.set_affiliation(ROOM, "none", jid=m, timeout=TIMEOUT)
            own, *_ = await join(mallory, ROOM, "mallory")
            assert own["muc"]["affiliation"] == "none"


async def test_participant_cannot_kick_but_moderator_can(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")
            condition = await iq_error(bob.muc.set_role(ROOM, "carol", "none", timeout=TIMEOUT))
            assert condition in ("not-allowed", "forbidden")  # §8.2
            participants = await alice.muc.get_roles_list(ROOM, "participant", timeout=TIMEOUT)
            assert sorted(participants) == ["bob", "carol"]

            await alice.muc.set_role(ROOM, "carol", "none", reason="too loud", timeout=TIMEOUT)
            # The kicked occupant and the others get unavailable presence with 307 (§8.2).
            kicked = await next_matching(
                carol.room_presences, presence_from(ROOM, "carol", available=False, code=307)
            )
            assert 110 in codes(kicked)
            assert kicked["muc"]["item"]["reason"] == "too loud"
            for client in (alice, bob):
                await next_matching(
                    client.room_presences,
                    presence_from(ROOM, "carol", available=False, code=307),
                )
            assert await alice.muc.get_roles_list(ROOM, "participant", timeout=TIMEOUT) == ["bob"]
            # A kick is not a ban.
            await join(carol, ROOM, "carol")


async def test_password_protected_room(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            await create_room(
                alice, ROOM, "alice", {PASSWORD_PROTECTED: "1", SECRET: "open sesame"}
            )
            assert await refused(bob, ROOM, "bob") == "not-authorized"  # §7.2.6
            assert await refused(bob, ROOM, "bob", password="guess") == "not-authorized"
            own = await enter(bob, ROOM, "bob", password="open sesame")
            assert own["type"] != "error" and 110 in codes(own)
            features = (await room_info(bob, ROOM))["disco_info"]["features"]
            assert "muc_passwordprotected" in features


async def test_semi_anonymous_room_shows_real_jids_to_moderators_only(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice", {WHOIS: "moderators"})
            own, *_ = await join(bob, ROOM, "bob")
            assert 100 not in codes(own)
            await join(carol, ROOM, "carol")
            to_moderator = await next_matching(alice.room_presences, presence_from(ROOM, "carol"))
            assert to_moderator["muc"]["jid"] == carol.boundjid  # §7.2.4
            to_participant = await next_matching(bob.room_presences, presence_from(ROOM, "carol"))
            item = to_participant.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}item")
            assert item is not None and item.get("jid") is None  # §7.2.3


# ── archive and history ──


async def test_member_reads_the_room_archive_and_rejoins_with_history(
    migrated_db_url: str, tmp_path: Path
) -> None:
    texts = ["one", "two", "three", "four"]
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, c = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        async with clients(MucClient(server, a), MucClient(server, c)) as (alice, carol):
            await logged_in(alice, carol)
            await create_room(alice, ROOM, "alice")
            await alice.muc.set_affiliation(ROOM, "member", jid=b, timeout=TIMEOUT)
            await join(carol, ROOM, "carol")
            received = []
            for i, text in enumerate(texts):
                sender = (alice, carol)[i % 2]
                sender.send_message(mto=ROOM, mbody=text, mtype="groupchat")
                received.append(await next_matching(alice.messages, live(ROOM, text)))
                await next_matching(carol.messages, live(ROOM, text))

            async with clients(MucClient(server, b)) as (bob,):
                await bob.login()  # Bob was offline all along; he reads what he missed.
                mam = bob.plugin["xep_0313"]
                answer = await mam.retrieve(jid=JID(ROOM), rsm={"max": 50}, timeout=TIMEOUT)
                results = answer["mam"]["results"]
                forwarded = [r["mam_result"]["forwarded"]["stanza"] for r in results]
                assert [f["body"] for f in forwarded] == texts
                assert [f["from"] for f in forwarded] == [
                    occupant(ROOM, nick) for nick in ("alice", "carol", "alice", "carol")
                ]
                assert all(f["type"] == "groupchat" for f in forwarded)
                ids = [r["mam_result"]["id"] for r in results]
                assert all(ids) and len(set(ids)) == len(ids)
                for r in results:
                    assert r["mam_result"]["forwarded"]["delay"]["stamp"] is not None
                # Each occupant was given the archive id as a stanza-id by the room (XEP-0359).
                assert [stanza_id(m, ROOM) for m in received] == ids

                first = await mam.retrieve(jid=JID(ROOM), rsm={"max": 2}, timeout=TIMEOUT)
                page = [
                    r["mam_result"]["forwarded"]["stanza"]["body"] for r in first["mam"]["results"]
                ]
                assert page == ["one", "two"]
                fin = first.xml.find(f"{{{NS_MAM}}}fin")
                assert fin is not None and fin.get("complete") != "true"
                last = first["mam_fin"]["rsm"]["last"]
                assert last == ids[1]
                second = await mam.retrieve(
                    jid=JID(ROOM), rsm={"max": 2, "after": last}, timeout=TIMEOUT
                )
                page = [
                    r["mam_result"]["forwarded"]["stanza"]["body"] for r in second["mam"]["results"]
                ]
                assert page == ["three", "four"]

                # Bob joins asking for two stanzas of history (§7.2.14): the last two
                # messages, delayed, from the room, then the subject (§7.2.15).
                _, subject, _, history = await join(bob, ROOM, "bob", maxstanzas=2)
                assert [m["body"] for m in history] == ["three", "four"]
                from_room = [
                    m
                    for m in bob.all_messages.items
                    if m["type"] == "groupchat" and m["from"].bare == ROOM
                ]
                assert [m["body"] for m in from_room] == ["three", "four", ""]
                assert from_room[-1]["id"] == subject["id"]
                assert from_room[-1].xml.find("{jabber:client}subject") is not None
                for message in from_room[:2]:
                    delay = message.xml.find("{urn:xmpp:delay}delay")
                    assert delay is not None and delay.get("from") == ROOM
                    assert message["from"].resource in ("alice", "carol")


# ── persistence ──


async def test_persistent_room_config_and_affiliations_survive_a_restart(
    migrated_db_url: str, tmp_path: Path
) -> None:
    config = {PERSISTENT: "1", MEMBERS_ONLY: "1", NAME: "Keepers"}
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, m, c = [await add_user(server, n) for n in ("alice", "bob", "mallory", "carol")]
        async with clients(MucClient(server, a)) as (alice,):
            await alice.login()
            await create_room(alice, ROOM, "alice", config)
            await alice.muc.set_affiliation(ROOM, "member", jid=b, timeout=TIMEOUT)
            await alice.muc.set_affiliation(ROOM, "outcast", jid=m, timeout=TIMEOUT)
            alice.muc.set_subject(ROOM, "kept subject")
            await next_matching(alice.all_messages, lambda msg: msg["subject"] == "kept subject")
            for text in ("before the restart", "last before the restart"):
                alice.send_message(mto=ROOM, mbody=text, mtype="groupchat")
                await next_matching(alice.messages, live(ROOM, text))
            await leave(alice, ROOM, "alice")

    async with running_server(migrated_db_url, tmp_path) as server:
        async with clients(*(MucClient(server, j) for j in (a, b, m, c))) as (
            alice,
            bob,
            mallory,
            carol,
        ):
            await logged_in(alice, bob, mallory, carol)
            info = (await room_info(carol, ROOM))["disco_info"]
            assert {"muc_persistent", "muc_membersonly"} <= set(info["features"])
            assert "Keepers" in {identity[3] for identity in info["identities"]}

            own, subject, _, history = await join(bob, ROOM, "bob", maxstanzas=2)
            assert own["muc"]["affiliation"] == "member"
            assert subject["subject"] == "kept subject"
            # The discussion history outlives the process too.
            assert [m["body"] for m in history] == ["before the restart", "last before the restart"]
            assert await refused(mallory, ROOM, "mallory") == "forbidden"
            assert await refused(carol, ROOM, "carol") == "registration-required"

            own, *_ = await join(alice, ROOM, "alice")
            assert (own["muc"]["affiliation"], own["muc"]["role"]) == ("owner", "moderator")
            assert 201 not in codes(own)
            values = (await alice.muc.get_room_config(ROOM, timeout=TIMEOUT)).get_values()
            assert truthy(values[MEMBERS_ONLY]) and truthy(values[PERSISTENT])
            assert values[NAME] == "Keepers"
            assert await affiliated(alice, ROOM, "member") == [b]
            assert await affiliated(alice, ROOM, "outcast") == [m]


# ── invitations, private messages, subject, errors, destruction ──


async def test_mediated_invitation_to_members_only_room_makes_a_member(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "carol", "dave") as ((a, c, d), (alice, carol, dave)):
            await create_room(alice, ROOM, "alice", {MEMBERS_ONLY: "1"})
            alice.muc.invite(ROOM, c, reason="come along")
            invitation = await next_matching(
                carol.messages,
                lambda msg: msg.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}invite") is not None,
            )
            assert invitation["from"] == ROOM  # §7.8.2: from the room's bare JID
            invite = invitation["muc"]["invite"]
            assert invite["from"].bare == a
            assert invite["reason"] == "come along"
            own, *_ = await join(carol, ROOM, "carol")
            assert own["muc"]["affiliation"] == "member"

            # Dave declines; the room relays the decline to Alice (§7.8.2).
            alice.muc.invite(ROOM, d)
            await next_matching(dave.messages, lambda msg: msg["from"] == ROOM)
            dave.muc.decline(ROOM, a, reason="busy")
            declined = await next_matching(
                alice.all_messages,
                lambda msg: (
                    msg.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}decline") is not None
                ),
            )
            assert declined["from"] == ROOM
            assert declined["muc"]["decline"]["from"].bare == d
            assert declined["muc"]["decline"]["reason"] == "busy"
            assert await affiliated(alice, ROOM, "member") == [c, d]


async def test_private_messages_between_occupants(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")
            bob.send_message(mto=occupant(ROOM, "alice"), mbody="psst", mtype="chat")
            got = await next_matching(alice.messages, lambda msg: msg["body"] == "psst")
            assert (got["from"], got["type"]) == (occupant(ROOM, "bob"), "chat")  # §7.5
            alice.send_message(mto=got["from"], mbody="what?", mtype="chat")
            reply = await next_matching(bob.messages, lambda msg: msg["body"] == "what?")
            assert reply["from"] == occupant(ROOM, "alice")

            bob.send_message(mto=occupant(ROOM, "nobody"), mbody="hello?", mtype="chat")
            error = await next_matching(bob.messages, lambda msg: msg["type"] == "error")
            assert error["error"]["condition"] == "item-not-found"
            # A groupchat message to one occupant is refused (§7.5).
            since = len(bob.all_messages.items)
            bob.send_message(mto=occupant(ROOM, "alice"), mbody="wrong type", mtype="groupchat")
            error = await next_matching(
                bob.all_messages, lambda msg: msg["type"] == "error", since=since
            )
            assert error["error"]["condition"] == "bad-request"

            # Carol, also in the room, saw none of it.
            alice.send_message(mto=ROOM, mbody="marker", mtype="groupchat")
            await next_matching(carol.messages, live(ROOM, "marker"))
            assert [m["body"] for m in carol.messages.items if m["type"] == "chat"] == []


async def test_subject_change_is_seen_by_all_and_by_newcomers(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            alice.muc.set_subject(ROOM, "Plans for Friday")
            for client in (alice, bob):
                change = await next_matching(
                    client.all_messages, lambda msg: msg["subject"] == "Plans for Friday"
                )
                assert change["from"] == occupant(ROOM, "alice")  # §8.1
                assert change["type"] == "groupchat" and not change["body"]
            _, subject, _, _ = await join(carol, ROOM, "carol")
            assert subject["subject"] == "Plans for Friday"


async def test_groupchat_from_a_non_occupant_is_refused(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "carol") as ((a, c), (alice, carol)):
            await create_room(alice, ROOM, "alice")
            carol.send_message(mto=ROOM, mbody="let me in", mtype="groupchat")
            error = await next_matching(carol.messages, lambda msg: msg["type"] == "error")
            assert error["from"] == ROOM
            assert error["error"]["condition"] == "not-acceptable"  # §7.9
            alice.send_message(mto=ROOM, mbody="marker", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "marker"))
            assert not [m for m in alice.messages.items if m["body"] == "let me in"]


async def test_owner_destroys_the_room(migrated_db_url: str, tmp_path: Path) -> None:
    other = f"elsewhere@{SERVICE}"
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            await create_room(alice, ROOM, "alice", {PERSISTENT: "1"})
            await join(bob, ROOM, "bob")
            assert await iq_error(bob.muc.destroy(ROOM, timeout=TIMEOUT)) == "forbidden"  # §10.9
            await alice.muc.destroy(ROOM, reason="moving", altroom=other, timeout=TIMEOUT)
            for client, nick in ((bob, "bob"), (alice, "alice")):
                gone = await next_matching(
                    client.room_presences, presence_from(ROOM, nick, available=False)
                )
                destroy = gone.xml.find(f"{{{NS_MUC_USER}}}x/{{{NS_MUC_USER}}}destroy")
                assert destroy is not None, gone
                assert destroy.get("jid") == other
                assert destroy.findtext(f"{{{NS_MUC_USER}}}reason") == "moving"
            assert await iq_error(room_info(bob, ROOM)) == "item-not-found"
            items = await alice.plugin["xep_0030"].get_items(jid=SERVICE, timeout=TIMEOUT)
            assert ROOM not in {item[0] for item in items["disco_items"]["items"]}


# ── discovery and self-ping ──


async def test_service_discovery_of_the_service_and_its_public_rooms(
    migrated_db_url: str, tmp_path: Path
) -> None:
    lobby, hidden = f"lobby@{SERVICE}", f"hidden@{SERVICE}"
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            info = (await room_info(bob, SERVICE))["disco_info"]
            assert ("conference", "text") in {i[:2] for i in info["identities"]}
            assert NS_MUC in info["features"]

            await create_room(alice, lobby, "alice", {PERSISTENT: "1", PUBLIC: "1", NAME: "Lobby"})
            await create_room(alice, hidden, "alice", {PERSISTENT: "1", PUBLIC: "0"})
            items = await bob.plugin["xep_0030"].get_items(jid=SERVICE, timeout=TIMEOUT)
            listed = {item[0]: item[2] for item in items["disco_items"]["items"]}
            assert listed.get(lobby) == "Lobby"
            assert hidden not in listed

            features = set((await room_info(bob, lobby))["disco_info"]["features"])
            assert {NS_MUC, "muc_persistent", "muc_public", "muc_open"} <= features
            features = set((await room_info(bob, hidden))["disco_info"]["features"])
            assert {"muc_persistent", "muc_hidden"} <= features


async def test_the_server_lists_its_muc_service(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(MucClient(server, a)) as (alice,):
            await alice.login()
            items = await alice.plugin["xep_0030"].get_items(jid=DOMAIN, timeout=TIMEOUT)
            assert SERVICE in {item[0] for item in items["disco_items"]["items"]}


async def test_self_ping_answers_while_joined_only(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            self_ping = bob.plugin["xep_0410"]
            status = await self_ping.send_self_ping(JID(occupant(ROOM, "bob")), timeout=TIMEOUT)
            assert status == PingStatus.JOINED
            await leave(bob, ROOM, "bob")
            ping = bob.plugin["xep_0199"]
            condition = await iq_error(ping.send_ping(occupant(ROOM, "bob"), timeout=TIMEOUT))
            assert condition == "not-acceptable"  # XEP-0410 §3: not joined
            status = await self_ping.send_self_ping(JID(occupant(ROOM, "bob")), timeout=TIMEOUT)
            assert status == PingStatus.DISCONNECTED


# ── more of §7: nicks, presence, sessions, connections, moderation, limits ──


async def test_nick_in_use_is_refused_and_presence_changes_are_broadcast(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            assert await refused(carol, ROOM, "bob") == "conflict"  # §7.2.9
            since = len(carol.room_presences.items)
            carol.send_presence(pto=ROOM)  # no nick (§7.2.1)
            no_nick = await next_matching(
                carol.room_presences, lambda p: p["from"] == ROOM, since=since
            )
            assert no_nick["type"] == "error"
            assert no_nick["error"]["condition"] == "jid-malformed"
            await join(carol, ROOM, "carol")
            # Taking an occupant's nick by a nick change is refused too (§7.6).
            since = len(carol.room_presences.items)
            carol.send_presence(pto=occupant(ROOM, "bob"))
            error = await next_matching(
                carol.room_presences, lambda p: p["type"] == "error", since=since
            )
            assert error["error"]["condition"] == "conflict"

            # §7.7: a change of availability reaches every occupant, from the occupant JID.
            bob.send_presence(pto=occupant(ROOM, "bob"), pshow="away", pstatus="brb")
            for client in (alice, bob, carol):
                away = await next_matching(
                    client.room_presences,
                    lambda p: p["from"] == occupant(ROOM, "bob") and p["show"] == "away",
                )
                assert away["status"] == "brb"
                assert away["muc"]["role"] == "participant"


async def test_two_sessions_of_one_user_share_a_nick(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            MucClient(server, f"{a}/desk"), MucClient(server, f"{a}/phone"), MucClient(server, b)
        ) as (desk, phone, bob):
            await logged_in(desk, phone, bob)
            await create_room(desk, ROOM, "alice")
            await join(bob, ROOM, "bob")
            own, *_ = await join(phone, ROOM, "alice")
            assert own["muc"]["affiliation"] == "owner"

            bob.send_message(mto=ROOM, mbody="to both", mtype="groupchat")
            bob.send_message(mto=occupant(ROOM, "alice"), mbody="private", mtype="chat")
            for session in (desk, phone):
                await next_matching(session.messages, live(ROOM, "to both"))
                pm = await next_matching(session.messages, lambda m: m["body"] == "private")
                assert pm["from"] == occupant(ROOM, "bob")

            # One session leaving leaves the occupant in the room.
            await leave(phone, ROOM, "alice")
            desk.send_message(mto=ROOM, mbody="still here", mtype="groupchat")
            await next_matching(bob.messages, live(ROOM, "still here"))
            gone = [
                p
                for p in bob.room_presences.items
                if p["from"] == occupant(ROOM, "alice") and p["type"] == "unavailable"
            ]
            assert gone == []
            assert await desk.muc.get_roles_list(ROOM, "moderator", timeout=TIMEOUT) == ["alice"]


async def test_occupant_whose_connection_drops_leaves_the_room(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")
            bob.abort()  # the TCP connection goes, without unavailable presence
            await next_matching(alice.room_presences, presence_from(ROOM, "bob", available=False))
            await carol.close()  # a clean </stream:stream>, without unavailable presence either
            await next_matching(alice.room_presences, presence_from(ROOM, "carol", available=False))
            assert await alice.muc.get_roles_list(ROOM, "participant", timeout=TIMEOUT) == []


async def test_visitors_of_a_moderated_room_need_voice(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob") as ((a, b), (alice, bob)):
            await create_room(alice, ROOM, "alice", {"muc#roomconfig_moderatedroom": "1"})
            own, *_ = await join(bob, ROOM, "bob")
            assert own["muc"]["role"] == "visitor"  # §5.1.2
            bob.send_message(mto=ROOM, mbody="can I speak?", mtype="groupchat")
            error = await next_matching(bob.messages, lambda m: m["type"] == "error")
            assert error["error"]["condition"] == "forbidden"  # §7.4

            await alice.muc.set_role(ROOM, "bob", "participant", timeout=TIMEOUT)  # §8.3
            for client in (alice, bob):
                voiced = await next_matching(
                    client.room_presences,
                    lambda p: (
                        p["from"] == occupant(ROOM, "bob") and p["muc"]["role"] == "participant"
                    ),
                )
                assert is_available(voiced)
            bob.send_message(mto=ROOM, mbody="thanks", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "thanks"))
            assert not [m for m in alice.messages.items if m["body"] == "can I speak?"]


async def test_full_room_refuses_newcomers(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice", {"muc#roomconfig_maxusers": "2"})
            await join(bob, ROOM, "bob")
            assert await refused(carol, ROOM, "carol") == "service-unavailable"  # §7.2.10
            await leave(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")


# ── §10: configuration ──


async def test_configuration_is_for_owners_and_changes_are_announced(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice", {WHOIS: "moderators"})
            await join(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")
            assert await iq_error(bob.muc.get_room_config(ROOM, timeout=TIMEOUT)) == "forbidden"
            assert await iq_error(configure(bob, ROOM, {NAME: "mine"})) == "forbidden"  # §10.2
            condition = await iq_error(
                bob.muc.get_affiliation_list(ROOM, "member", timeout=TIMEOUT)
            )
            assert condition == "forbidden"

            # §10.2.1: occupants are told of the change; 172: now non-anonymous.
            await configure(alice, ROOM, {WHOIS: "anyone"})
            for client in (alice, bob, carol):
                notice = await next_matching(
                    client.all_messages, lambda m: m["from"] == ROOM and 172 in codes(m)
                )
                assert 104 in codes(notice) and not notice["body"]

            # Becoming members-only removes the non-members, with status code 322.
            await alice.muc.set_affiliation(ROOM, "member", jid=c, timeout=TIMEOUT)
            await configure(alice, ROOM, {MEMBERS_ONLY: "1"})
            for client in (alice, bob, carol):
                await next_matching(
                    client.room_presences,
                    presence_from(ROOM, "bob", available=False, code=322),
                )
            carol.send_message(mto=ROOM, mbody="members only now", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "members only now"))
            removed = [
                p
                for p in alice.room_presences.items
                if p["from"] == occupant(ROOM, "carol") and p["type"] == "unavailable"
            ]
            assert removed == []


async def test_granted_affiliations_change_roles_in_view_of_everyone(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            await create_room(alice, ROOM, "alice")
            await join(bob, ROOM, "bob")
            await join(carol, ROOM, "carol")
            await alice.muc.set_affiliation(ROOM, "admin", jid=b, timeout=TIMEOUT)  # §10.6
            for client in (alice, bob, carol):
                promoted = await next_matching(
                    client.room_presences,
                    lambda p: (
                        p["from"] == occupant(ROOM, "bob") and p["muc"]["affiliation"] == "admin"
                    ),
                )
                assert promoted["muc"]["role"] == "moderator" and is_available(promoted)
            # Now a moderator, Bob may kick Carol; and he may not touch the owner.
            condition = await iq_error(bob.muc.set_role(ROOM, "alice", "none", timeout=TIMEOUT))
            assert condition == "not-allowed"  # §8.2
            await bob.muc.set_role(ROOM, "carol", "none", timeout=TIMEOUT)
            await next_matching(
                carol.room_presences, presence_from(ROOM, "carol", available=False, code=307)
            )
            assert await affiliated(alice, ROOM, "admin") == [b]
            assert await affiliated(bob, ROOM, "owner") == [a]


# ── archive privacy ──


async def test_archive_is_for_those_who_may_read_the_room(
    migrated_db_url: str, tmp_path: Path
) -> None:
    closed = f"closed@{SERVICE}"
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "bob", "carol") as ((a, b, c), (alice, bob, carol)):
            # A members-only room's archive is not for outsiders.
            await create_room(alice, closed, "alice", {MEMBERS_ONLY: "1"})
            alice.send_message(mto=closed, mbody="members' secret", mtype="groupchat")
            await next_matching(alice.messages, live(closed, "members' secret"))
            mam = carol.plugin["xep_0313"]
            with pytest.raises(IqError):
                await mam.retrieve(jid=JID(closed), rsm={"max": 10}, timeout=TIMEOUT)

            # A semi-anonymous room's archive does not give non-moderators real JIDs.
            await create_room(alice, ROOM, "alice", {WHOIS: "moderators"})
            await join(bob, ROOM, "bob")
            bob.send_message(mto=ROOM, mbody="who am I?", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "who am I?"))
            answer = await mam.retrieve(jid=JID(ROOM), rsm={"max": 10}, timeout=TIMEOUT)
            results = answer["mam"]["results"]
            assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in results] == [
                "who am I?"
            ]
            assert b not in str(results[0]), str(results[0])


async def test_recreated_room_does_not_inherit_the_old_rooms_archive(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "mallory") as ((a, m), (alice, mallory)):
            await create_room(alice, ROOM, "alice", {PERSISTENT: "1", MEMBERS_ONLY: "1"})
            alice.send_message(mto=ROOM, mbody="old secret", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "old secret"))
            await alice.muc.destroy(ROOM, reason="done", timeout=TIMEOUT)
            await next_matching(alice.room_presences, presence_from(ROOM, "alice", available=False))

            # Someone else takes the name: the room is new, and so is its archive and history.
            await create_room(mallory, ROOM, "mallory")
            answer = await mallory.plugin["xep_0313"].retrieve(
                jid=JID(ROOM), rsm={"max": 10}, timeout=TIMEOUT
            )
            bodies = [
                r["mam_result"]["forwarded"]["stanza"]["body"] for r in answer["mam"]["results"]
            ]
            assert bodies == []


async def test_temporary_room_rejoined_at_once_starts_with_an_empty_archive(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """Leave a temporary room and re-create it in the next breath: the old room's archive is
    purged in the background, and a query on the new room waits for that purge."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(MucClient(server, a)) as (alice,):
            await alice.login()
            await create_room(alice, ROOM, "alice")
            alice.send_message(mto=ROOM, mbody="old secret", mtype="groupchat")
            await next_matching(alice.messages, live(ROOM, "old secret"))
            alice.send_presence(pto=occupant(ROOM, "alice"), ptype="unavailable")
            alice.muc.make_join_stanza(JID(ROOM), "alice").send()
            await next_matching(
                alice.room_presences, presence_from(ROOM, "alice", available=False, code=110)
            )
            await next_matching(alice.room_presences, presence_from(ROOM, "alice", code=201))
            answer = await alice.plugin["xep_0313"].retrieve(
                jid=JID(ROOM), rsm={"max": 10}, timeout=TIMEOUT
            )
            assert answer["mam"]["results"] == []


async def test_direct_invitation_to_members_only_room_makes_a_member(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """XEP-0249: an owner's direct invitation (user to user, not through the room) admits the
    invitee to a members-only room; a plain member's does not (no muc#roomconfig_allowinvites)."""
    async with running_server(migrated_db_url, tmp_path) as server:
        async with online(server, "alice", "carol", "dave") as ((a, c, d), (alice, carol, dave)):
            await create_room(alice, ROOM, "alice", {MEMBERS_ONLY: "1"})

            def direct_invite(sender: MucClient, to: str) -> None:
                message = sender.make_message(mto=to, mbody=f"join {ROOM}", mtype="normal")
                x = ET.SubElement(message.xml, "{jabber:x:conference}x")
                x.set("jid", ROOM)
                message.send()

            direct_invite(alice, c)
            got = await next_matching(carol.messages, lambda m: m["body"] == f"join {ROOM}")
            assert got.xml.find("{jabber:x:conference}x").get("jid") == ROOM
            own, *_ = await join(carol, ROOM, "carol")
            assert own["muc"]["affiliation"] == "member"

            direct_invite(carol, d)  # carol is only a member
            await next_matching(dave.messages, lambda m: m["body"] == f"join {ROOM}")
            assert await refused(dave, ROOM, "dave") == "registration-required"
