"""XEP-0033 multicast through the server, with slixmpp's ``xep_0033`` stanzas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.e2e.harness import Client, add_user, clients, next_matching, running_server
from tests.e2e.test_carbons import CarbonsClient

NS_ADDRESS = "http://jabber.org/protocol/address"


def multicast(sender: Client, body: str, *addresses: dict[str, Any]) -> None:
    """One message to the server with an address header."""
    message = sender.make_message(mto="localhost", mbody=body)
    for address in addresses:
        message["addresses"].add_address(**address)
    message.send()


def addressing(client: Client) -> Client:
    client.register_plugin("xep_0033")
    return client


def header(message: Any) -> list[tuple[str, str, str, bool]]:
    """(type, jid, uri, delivered) of each address a received copy carries."""
    return [
        (a["type"], str(a["jid"]), a["uri"], a["delivered"])
        for a in message["addresses"]["addresses"]
    ]


async def test_server_advertises_multicast(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            info = await alice.plugin["xep_0030"].get_info("localhost")
            assert NS_ADDRESS in info["disco_info"]["features"]


async def test_one_stanza_reaches_fifty_recipients(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        users = [await add_user(server, f"user{i:02}") for i in range(50)]
        online = [addressing(Client(server, jid)) for jid in users[:10]]
        async with clients(addressing(Client(server, a)), *online) as (alice, *recipients):
            await asyncio.gather(alice.login(), *(r.login() for r in recipients))
            multicast(
                alice,
                "hello, all fifty of you",
                *({"atype": "to" if i % 2 else "cc", "jid": jid} for i, jid in enumerate(users)),
            )
            for recipient in recipients:
                got = await next_matching(
                    recipient.messages, lambda m: m["body"] == "hello, all fifty of you"
                )
                assert got["from"] == alice.boundjid
                assert got["to"].bare == recipient.boundjid.bare
                addresses = header(got)
                assert len(addresses) == 50
                assert all(delivered for *_, delivered in addresses)
            # The other forty were offline: each has it stored once.
            async with asyncio.timeout(10):
                for jid in users[10:]:
                    while await server.host.storage.offline.count(jid) < 1:
                        await asyncio.sleep(0.05)
                    assert await server.host.storage.offline.count(jid) == 1
        async with clients(addressing(Client(server, users[-1]))) as (late,):
            await late.login()
            got = await next_matching(
                late.messages, lambda m: m["body"] == "hello, all fifty of you"
            )
            assert got["from"] == alice.boundjid


async def test_bcc_is_hidden_and_reply_hints_kept(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, c, d, e = [
            await add_user(server, name) for name in ("alice", "bob", "carol", "dave", "erin")
        ]
        async with clients(*(addressing(Client(server, jid)) for jid in (a, b, c, d, e))) as (
            alice,
            bob,
            carol,
            dave,
            erin,
        ):
            for client in (alice, bob, carol, dave, erin):
                await client.login()
            multicast(
                alice,
                "meeting at noon",
                {"atype": "to", "jid": b},
                {"atype": "cc", "jid": c},
                {"atype": "bcc", "jid": d},
                {"atype": "bcc", "jid": e},
                {"atype": "to", "uri": "mailto:frank@example.org"},
                {"atype": "replyto", "jid": c},
                {"atype": "noreply"},
            )
            shared = [
                ("to", b, "", True),
                ("cc", c, "", True),
                ("to", "", "mailto:frank@example.org", False),
                ("replyto", c, "", False),
                ("noreply", "", "", False),
            ]
            for client in (bob, carol):
                got = await next_matching(client.messages, lambda m: m["body"] == "meeting at noon")
                assert header(got) == shared
            for client, jid in ((dave, d), (erin, e)):
                got = await next_matching(client.messages, lambda m: m["body"] == "meeting at noon")
                assert header(got) == [*shared, ("bcc", jid, "", True)]
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in alice.messages.items if m["body"] == "meeting at noon"]


async def test_delivered_addresses_are_not_sent_again(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b, c = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        async with clients(*(addressing(Client(server, jid)) for jid in (a, b, c))) as (
            alice,
            bob,
            carol,
        ):
            for client in (alice, bob, carol):
                await client.login()
            multicast(
                alice,
                "second hop",
                {"atype": "to", "jid": b, "delivered": True},
                {"atype": "to", "jid": c},
            )
            got = await next_matching(carol.messages, lambda m: m["body"] == "second hop")
            assert header(got) == [("to", b, "", True), ("to", c, "", True)]
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in bob.messages.items if m["body"] == "second hop"]


async def test_too_many_recipients_is_refused(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"addressing": {"max_recipients": 3}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(addressing(Client(server, a)), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            # Duplicates count once: three distinct recipients are allowed...
            multicast(
                alice,
                "three",
                *({"atype": "to", "jid": f"user{i}@localhost"} for i in range(2)),
                {"atype": "to", "jid": b},
                {"atype": "cc", "jid": b},
            )
            await next_matching(bob.messages, lambda m: m["body"] == "three")
            # ...four are not, and nobody gets any of it.
            multicast(
                alice,
                "four",
                *({"atype": "to", "jid": f"user{i}@localhost"} for i in range(3)),
                {"atype": "to", "jid": b},
            )
            error = await next_matching(
                alice.messages, lambda m: m["type"] == "error" and m["body"] == "four"
            )
            assert error["error"]["condition"] == "not-acceptable"
            assert error["from"] == "localhost"
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in bob.messages.items if m["body"] == "four"]


async def test_each_copy_is_an_ordinary_message(migrated_db_url: str, tmp_path: Path) -> None:
    """Per-recipient errors come back from that recipient; the sender's other devices see the
    multicast through carbons; a malformed address refuses the whole message."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            addressing(CarbonsClient(server, f"{a}/phone")),
            CarbonsClient(server, f"{a}/laptop"),
            Client(server, b),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await bob.login()
            multicast(
                phone,
                "anyone there?",
                {"atype": "to", "jid": "nobody@localhost"},
                {"atype": "to", "jid": b},
            )
            await next_matching(bob.messages, lambda m: m["body"] == "anyone there?")
            error = await next_matching(phone.messages, lambda m: m["type"] == "error")
            assert error["from"] == "nobody@localhost"
            assert error["error"]["condition"] == "service-unavailable"
            copy = await next_matching(laptop.sent_copies, lambda m: True)
            assert copy["carbon_sent"]["to"] == "localhost"

            multicast(phone, "bad", {"atype": "to", "jid": "@localhost"}, {"atype": "to", "jid": b})
            error = await next_matching(
                phone.messages, lambda m: m["type"] == "error" and m["body"] == "bad"
            )
            assert error["error"]["condition"] == "jid-malformed"
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in bob.messages.items if m["body"] == "bad"]
