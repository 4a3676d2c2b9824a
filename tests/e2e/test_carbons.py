"""XEP-0280 Message Carbons with slixmpp's own plugin: which copies arrive where, and which not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET

from tests.e2e.harness import Client, Mailbox, add_user, clients, next_matching, running_server
from xmpp_server.jid import JID
from xmpp_server.modules.carbons import eligible
from xmpp_server.xml import fromstring

NS_CARBONS = "urn:xmpp:carbons:2"


class CarbonsClient(Client):
    """A client that can enable carbons and keeps the copies it gets apart."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_plugin("xep_0280")
        self.sent_copies = Mailbox()
        self.received_copies = Mailbox()
        self.add_event_handler("carbon_sent", self.sent_copies.put_nowait)
        self.add_event_handler("carbon_received", self.received_copies.put_nowait)

    async def login_with_carbons(self, *, priority: int = 0) -> None:
        await self.login(presence=False)
        await self.plugin["xep_0280"].enable(timeout=10)
        self.send_presence(ppriority=priority)
        await self.get_roster()

    async def settle(self) -> None:
        """A round trip: everything the server wrote to us before it has been read."""
        await self.plugin["xep_0199"].ping("localhost", timeout=10)


def sent_bodies(client: CarbonsClient) -> list[str]:
    return [m["carbon_sent"]["body"] for m in client.sent_copies.items]


def received_bodies(client: CarbonsClient) -> list[str]:
    return [m["carbon_received"]["body"] for m in client.received_copies.items]


async def test_server_advertises_carbons(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            info = await alice.plugin["xep_0030"].get_info("localhost")
            assert NS_CARBONS in info["disco_info"]["features"]


async def test_sent_and_received_copies(migrated_db_url: str, tmp_path: Path) -> None:
    """§7, §8: the other carbons-enabled resources see both directions; the sending resource
    and resources without carbons get no copy."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            CarbonsClient(server, f"{a}/desk"),
            Client(server, b),
        ) as (phone, laptop, desk, bob):
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await desk.login()
            await bob.login()

            phone.send_message(mto=b, mbody="hi bob", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "hi bob")
            copy = await next_matching(laptop.sent_copies, lambda m: True)
            assert copy["from"] == a
            assert copy["to"] == laptop.boundjid
            assert copy["type"] == "chat"
            inner = copy["carbon_sent"]
            assert inner["body"] == "hi bob"
            assert inner["from"] == phone.boundjid
            assert inner["to"] == b

            bob.send_message(mto=phone.boundjid, mbody="hi phone", mtype="chat")
            await next_matching(phone.messages, lambda m: m["body"] == "hi phone")
            copy = await next_matching(laptop.received_copies, lambda m: True)
            assert copy["from"] == a
            inner = copy["carbon_received"]
            assert inner["body"] == "hi phone"
            assert inner["from"] == bob.boundjid
            assert inner["to"] == phone.boundjid
            # The copy carries what the recipient got, the server's stanza-id included.
            assert inner.xml.find("{urn:xmpp:sid:0}stanza-id") is not None

            for client in (phone, laptop, desk):
                await client.settle()
            assert not phone.sent_copies.items and not phone.received_copies.items
            assert not desk.sent_copies.items and not desk.received_copies.items
            assert not [m for m in desk.messages.items if m["body"]]
            assert len(laptop.sent_copies.items) == 1
            assert len(laptop.received_copies.items) == 1


async def test_bare_jid_message_copied_to_the_resources_that_did_not_get_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons(priority=5)
            await laptop.login_with_carbons(priority=1)
            await bob.login()
            bob.send_message(mto=a, mbody="to the top", mtype="chat")
            await next_matching(phone.messages, lambda m: m["body"] == "to the top")
            copy = await next_matching(laptop.received_copies, lambda m: True)
            assert copy["carbon_received"]["body"] == "to the top"

            # Equal priorities: both get the message itself, so nobody gets a copy.
            laptop.send_presence(ppriority=5)
            await laptop.settle()
            bob.send_message(mto=a, mbody="to both", mtype="chat")
            await next_matching(phone.messages, lambda m: m["body"] == "to both")
            await next_matching(laptop.messages, lambda m: m["body"] == "to both")
            for client in (phone, laptop):
                await client.settle()
            assert "to both" not in received_bodies(phone) + received_bodies(laptop)


async def test_private_and_no_copy_messages_are_not_copied(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await bob.login()

            secret = phone.make_message(mto=b, mbody="secret out", mtype="chat")
            secret.xml.append(ET.Element(f"{{{NS_CARBONS}}}private"))
            secret.xml.append(ET.Element("{urn:xmpp:hints}no-copy"))
            secret.send()
            phone.send_message(mto=b, mbody="public out", mtype="chat")
            got = await next_matching(bob.messages, lambda m: m["body"] == "secret out")
            # Delivered as sent: the server does not strip <private/> (XEP-0280 §9 note).
            assert got.xml.find(f"{{{NS_CARBONS}}}private") is not None
            await next_matching(
                laptop.sent_copies, lambda m: m["carbon_sent"]["body"] == "public out"
            )

            secret = bob.make_message(mto=phone.boundjid, mbody="secret in", mtype="chat")
            secret.xml.append(ET.Element("{urn:xmpp:hints}no-copy"))
            secret.send()
            bob.send_message(mto=phone.boundjid, mbody="public in", mtype="chat")
            await next_matching(phone.messages, lambda m: m["body"] == "secret in")
            await next_matching(
                laptop.received_copies, lambda m: m["carbon_received"]["body"] == "public in"
            )
            assert sent_bodies(laptop) == ["public out"]
            assert received_bodies(laptop) == ["public in"]


async def test_disable_and_reconnect_stop_copies(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await bob.login()
            # Enabling twice is not an error (§10.1).
            await laptop.plugin["xep_0280"].enable(timeout=10)
            await laptop.plugin["xep_0280"].disable(timeout=10)
            await laptop.plugin["xep_0280"].disable(timeout=10)
            phone.send_message(mto=b, mbody="one", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "one")
            await laptop.settle()
            assert not laptop.sent_copies.items

            await laptop.plugin["xep_0280"].enable(timeout=10)
            phone.send_message(mto=b, mbody="two", mtype="chat")
            await next_matching(laptop.sent_copies, lambda m: m["carbon_sent"]["body"] == "two")
            await laptop.close()

        # The same resource again, without enabling: the old session's choice is gone.
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons()
            await laptop.login()
            await bob.login()
            phone.send_message(mto=b, mbody="three", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "three")
            await laptop.settle()
            assert not laptop.sent_copies.items
            assert server.host.modules["carbons"].enabled == {JID.parse(phone.boundjid.full)}


async def test_chat_states_copied_headlines_not(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CarbonsClient(server, f"{a}/phone"),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            phone.register_plugin("xep_0085")
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await bob.login()
            phone.send_message(mto=b, mbody="news", mtype="headline")
            typing = phone.make_message(mto=b, mtype="chat")
            typing["chat_state"] = "composing"
            typing.send()
            copy = await next_matching(laptop.sent_copies, lambda m: True)
            assert (
                copy["carbon_sent"].xml.find("{http://jabber.org/protocol/chatstates}composing")
                is not None
            )
            await laptop.settle()
            assert len(laptop.sent_copies.items) == 1  # not the headline


async def test_carbons_only_for_ones_own_account(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(CarbonsClient(server, a)) as (alice,):
            await alice.login()
            request = alice.make_iq_set(ito=b)
            request.enable("carbon_enable")
            with pytest.raises(IqError) as refused:
                await request.send(timeout=10)
            assert refused.value.iq["error"]["condition"] == "service-unavailable"
            assert not server.host.modules["carbons"].enabled


@pytest.mark.parametrize(
    ("xml", "sent", "expected"),
    [
        ("<message type='chat'/>", False, True),
        ("<message><body>x</body></message>", False, True),
        ("<message/>", False, False),
        ("<message><received xmlns='urn:xmpp:receipts' id='1'/></message>", False, True),
        ("<message><displayed xmlns='urn:xmpp:chat-markers:0' id='1'/></message>", False, True),
        ("<message type='headline'><body>x</body></message>", False, False),
        ("<message type='groupchat'><body>x</body></message>", True, False),
        ("<message type='error'><body>x</body></message>", False, False),
        ("<message type='chat'><private xmlns='urn:xmpp:carbons:2'/></message>", True, False),
        ("<message type='chat'><no-copy xmlns='urn:xmpp:hints'/></message>", False, False),
        ("<message type='chat'><sent xmlns='urn:xmpp:carbons:2'/></message>", True, False),
        ("<message><x xmlns='jabber:x:conference' jid='r@muc'/></message>", True, True),
        (
            "<message><x xmlns='http://jabber.org/protocol/muc#user'><invite/></x></message>",
            False,
            True,
        ),
        (
            "<message type='chat'><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
            False,
            False,
        ),
        (
            "<message type='chat'><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
            True,
            True,
        ),
    ],
)
def test_eligibility_rules(xml: str, sent: bool, expected: bool) -> None:
    """XEP-0280 §6.1."""
    assert eligible(fromstring(xml), sent=sent) is expected
