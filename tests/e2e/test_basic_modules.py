"""The basic XEPs through slixmpp's own plugins: last seen, vCard, blocking, version, disco."""

from __future__ import annotations

from pathlib import Path

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.e2e.befriend import befriend
from tests.e2e.harness import Client, add_user, clients, next_matching, running_server


async def test_last_seen_only_for_subscribed_contacts(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        c = await add_user(server, "carol")
        async with clients(Client(server, a), Client(server, b), Client(server, c)) as (
            alice,
            bob,
            carol,
        ):
            for client in (alice, bob, carol):
                client.register_plugin("xep_0012")
                await client.login()
            await befriend(alice, bob)
            online = await bob.plugin["xep_0012"].get_last_activity(a)
            assert online["last_activity"]["seconds"] == 0
            alice.send_presence(ptype="unavailable", pstatus="gone fishing")
            await next_matching(
                bob.presences, lambda p: p["from"] == alice.boundjid and p["type"] == "unavailable"
            )
            seen = await bob.plugin["xep_0012"].get_last_activity(a)
            assert seen["last_activity"]["seconds"] >= 0
            assert seen["last_activity"]["status"] == "gone fishing"
            with pytest.raises(IqError) as refused:
                await carol.plugin["xep_0012"].get_last_activity(a)
            # Not forbidden: a stranger must not learn that alice exists (issue 13, defect 9).
            assert refused.value.iq["error"]["condition"] == "service-unavailable"


async def test_vcard_publish_and_fetch(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            for client in (alice, bob):
                client.register_plugin("xep_0054")
                await client.login(presence=False)
            card = alice.plugin["xep_0054"].make_vcard()
            card["FN"] = "Alice Liddell"
            card["NICKNAME"] = "alice"
            await alice.plugin["xep_0054"].publish_vcard(card)
            got = await bob.plugin["xep_0054"].get_vcard(a, cached=False)
            assert got["vcard_temp"]["FN"] == "Alice Liddell"


async def test_blocked_contact_cannot_message(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            for client in (alice, bob):
                client.register_plugin("xep_0191")
                await client.login()
            await alice.plugin["xep_0191"].block(b)
            blocklist = await alice.plugin["xep_0191"].get_blocked()
            assert b in {str(item["jid"]) for item in blocklist["blocklist"]["items"]}
            bob.send_message(mto=a, mbody="let me in", mtype="chat")
            alice.send_message(mto=b, mbody="go away", mtype="chat")
            error = await next_matching(alice.messages, lambda m: m["type"] == "error")
            assert error["error"]["condition"] == "not-acceptable"
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in alice.messages.items if m["body"] == "let me in"]
            await alice.plugin["xep_0191"].unblock(b)
            bob.send_message(mto=a, mbody="friends again?", mtype="chat")
            await next_matching(alice.messages, lambda m: m["body"] == "friends again?")


async def test_server_disco_and_version(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            alice.register_plugin("xep_0092")
            await alice.login(presence=False)
            info = await alice.plugin["xep_0030"].get_info(jid="localhost")
            features = set(info["disco_info"]["features"])
            for feature in (
                "http://jabber.org/protocol/disco#info",
                "urn:xmpp:ping",
                "vcard-temp",
                "jabber:iq:last",
                "urn:xmpp:blocking",
                "jabber:iq:version",
            ):
                assert feature in features
            assert ("server", "im") in {(i[0], i[1]) for i in info["disco_info"]["identities"]}
            version = await alice.plugin["xep_0092"].get_version("localhost")
            assert version["software_version"]["name"] == "natterd"


async def test_unhandled_iq_is_service_unavailable(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login(presence=False)
            bogus = alice.Iq()
            bogus["type"] = "get"
            bogus["to"] = "localhost"
            bogus.xml.append(ET.Element("{urn:example:nothing}query"))
            with pytest.raises(IqError) as refused:
                await bogus.send()
            assert refused.value.iq["error"]["condition"] == "service-unavailable"
