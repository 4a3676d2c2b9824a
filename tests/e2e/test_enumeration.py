"""Defect 9 of issue 13: errors must not tell a stranger which accounts exist.

XEP-0054 §3.3 asks it of vCards; the router applies it to every iq and message addressed to
a local account: whoever is neither the account nor a contact with a presence subscription
to it gets the very answer a JID that is no account gets (``service-unavailable``)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slixmpp.exceptions import IqError

from tests.e2e.befriend import befriend
from tests.e2e.harness import Client, add_user, clients, running_server

QUERIES = {
    "vcard": ("get", "<vCard xmlns='vcard-temp'/>"),
    "vcard-set": ("set", "<vCard xmlns='vcard-temp'><FN>x</FN></vCard>"),
    "last": ("get", "<query xmlns='jabber:iq:last'/>"),
    "pep": (
        "get",
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
        "<items node='urn:xmpp:avatar:metadata'/></pubsub>",
    ),
    "mam": ("set", "<query xmlns='urn:xmpp:mam:2'/>"),
    "mam-prefs": ("get", "<prefs xmlns='urn:xmpp:mam:2'/>"),
    "roster": ("get", "<query xmlns='jabber:iq:roster'/>"),
    "blocklist": ("get", "<blocklist xmlns='urn:xmpp:blocking'/>"),
    "version": ("get", "<query xmlns='jabber:iq:version'/>"),
    "disco": ("get", "<query xmlns='http://jabber.org/protocol/disco#info'/>"),
    "ping": ("get", "<ping xmlns='urn:xmpp:ping'/>"),
    "register": ("get", "<query xmlns='jabber:iq:register'/>"),
    "unknown": ("get", "<query xmlns='urn:example:nothing'/>"),
}


async def answer(client: Client, to: str, type_: str, payload: str) -> str:
    """The reply to an iq, with what must differ (addresses, id) taken out."""
    iq = client.make_iq_get(ito=to) if type_ == "get" else client.make_iq_set(ito=to)
    iq.xml.append(ET.fromstring(payload))
    try:
        reply = await iq.send(timeout=15)
    except IqError as exc:
        reply = exc.iq
    text = ET.tostring(reply.xml, encoding="unicode")
    text = re.sub(r' (from|to|id)="[^"]*"', "", text)
    return text


@pytest.mark.parametrize("name", sorted(QUERIES))
async def test_strangers_cannot_tell_accounts_from_nothing(
    migrated_db_url: str, tmp_path: Path, name: str
) -> None:
    type_, payload = QUERIES[name]
    async with running_server(migrated_db_url, tmp_path) as server:
        alice = await add_user(server, "alice")  # exists, has no vCard, never logged out
        carol = await add_user(server, "carol")
        async with clients(Client(server, carol)) as (stranger,):
            await stranger.login()
            existing = await answer(stranger, alice, type_, payload)
            missing = await answer(stranger, "nobody@localhost", type_, payload)
            assert existing == missing
            assert "service-unavailable" in existing


async def test_contacts_and_the_account_itself_still_get_real_answers(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await befriend(alice, bob)
            # A contact may see last activity (alice is online: 0 s) ...
            last = await answer(bob, a, *QUERIES["last"])
            assert 'type="result"' in last and 'seconds="0"' in last
            # ... and gets the module's own error where there is one.
            blocklist = await answer(bob, a, *QUERIES["blocklist"])
            assert "forbidden" in blocklist
            # The account itself always gets the real answer.
            own = await answer(alice, a, *QUERIES["vcard"])
            assert 'type="result"' in own
            # A missing vCard is answered the same for a contact and for nobody (§3.3).
            assert await answer(bob, a, *QUERIES["vcard"]) == await answer(
                bob, "nobody@localhost", *QUERIES["vcard"]
            )


async def test_registration_requests_for_others_look_like_no_account(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"register": {"enabled": True}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        alice = await add_user(server, "alice")
        carol = await add_user(server, "carol")
        remove = "<query xmlns='jabber:iq:register'><remove/></query>"
        async with clients(Client(server, carol)) as (stranger,):
            await stranger.login()
            for type_, payload in (("get", QUERIES["register"][1]), ("set", remove)):
                existing = await answer(stranger, alice, type_, payload)
                assert existing == await answer(stranger, "nobody@localhost", type_, payload)
                assert "service-unavailable" in existing
        assert await server.host.storage.accounts.exists(alice)
