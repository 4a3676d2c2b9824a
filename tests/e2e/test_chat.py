"""Rosters, subscriptions, presence and 1:1 messages between two slixmpp clients (RFC 6121)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.befriend import befriend
from tests.e2e.harness import Client, add_user, clients, next_matching, running_server


async def test_two_users_subscribe_see_presence_and_chat(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await befriend(alice, bob)
            # Both see each other online once the subscriptions are mutual.
            await next_matching(
                alice.presences, lambda p: p["from"] == bob.boundjid and p["type"] == "available"
            )
            await next_matching(
                bob.presences, lambda p: p["from"] == alice.boundjid and p["type"] == "available"
            )
            # The clients' rosters are kept current by roster pushes (RFC 6121 §2.1.6).
            assert alice.client_roster[b]["subscription"] == "both"
            assert bob.client_roster[a]["subscription"] == "both"
            # A fresh roster fetch without a version returns the full roster.
            request = alice.Iq()
            request["type"] = "get"
            request.enable("roster")
            full = await request.send()
            assert full["roster"]["items"][b]["subscription"] == "both"

            alice.send_message(mto=b, mbody="hello bob", mtype="chat")
            msg = await next_matching(bob.messages, lambda m: m["body"] == "hello bob")
            assert msg["from"] == alice.boundjid
            bob.send_message(mto=msg["from"], mbody="hi alice", mtype="chat")
            reply = await next_matching(alice.messages, lambda m: m["body"] == "hi alice")
            assert reply["from"] == bob.boundjid

            # Going offline is seen by the contact.
            bob.send_presence(ptype="unavailable")
            await next_matching(
                alice.presences,
                lambda p: p["from"] == bob.boundjid and p["type"] == "unavailable",
            )


async def test_presence_is_probed_on_login(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await befriend(alice, bob)
            await bob.close()
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            # Alice logged in first: she learns of Bob by his broadcast; Bob by his probe.
            await next_matching(bob.presences, lambda p: p["from"] == alice.boundjid)
            await next_matching(alice.presences, lambda p: p["from"] == bob.boundjid)


async def test_message_to_unknown_user_bounces(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            alice.send_message(mto="nobody@localhost", mbody="anyone?", mtype="chat")
            error = await next_matching(alice.messages, lambda m: m["type"] == "error")
            assert error["error"]["condition"] == "service-unavailable"
            assert error["from"] == "nobody@localhost"


async def test_message_to_other_domain_bounces(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            alice.send_message(mto="bob@elsewhere.example", mbody="hi", mtype="chat")
            error = await next_matching(alice.messages, lambda m: m["type"] == "error")
            assert error["error"]["condition"] == "remote-server-not-found"


async def test_spoofed_from_is_overwritten(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        await add_user(server, "carol")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            msg = alice.make_message(mto=b, mbody="I am carol", mtype="chat")
            msg["from"] = "carol@localhost/evil"
            msg.send()
            got = await next_matching(bob.messages, lambda m: m["body"] == "I am carol")
            assert got["from"] == alice.boundjid


async def test_message_to_offline_user_is_delivered_on_login(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            for i in range(3):
                alice.send_message(mto=b, mbody=f"while you were out {i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
        async with clients(Client(server, b)) as (bob,):
            await bob.login()
            bodies = []
            for _ in range(3):
                msg = await next_matching(bob.messages, lambda m: m["type"] == "chat")
                bodies.append(msg["body"])
                assert msg["delay"]["stamp"] is not None
            assert bodies == [f"while you were out {i}" for i in range(3)]


async def test_roster_remove_cancels_subscription(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            await befriend(alice, bob)
            await next_matching(alice.presences, lambda p: p["from"] == bob.boundjid)
            await alice.del_roster_item(b)
            await next_matching(bob.presences, lambda p: p["type"] == "unsubscribe")
            await next_matching(bob.presences, lambda p: p["type"] == "unsubscribed")
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            assert bob.client_roster[a]["subscription"] == "none"


async def test_pre_approved_subscription_needs_no_prompt(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """RFC 6121 §3.4: Alice pre-approves Bob; his later request is granted without asking her."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            alice.send_presence(pto=b, ptype="subscribed")
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            item = await server.host.storage.rosters.get(a, b)
            assert item is not None and item.approved and item.subscription == "none"
            assert not [p for p in bob.presences.items if p["type"] == "subscribed"]

            bob.send_presence_subscription(pto=a)
            await next_matching(bob.presences, lambda p: p["type"] == "subscribed")
            await next_matching(
                bob.presences, lambda p: p["from"] == alice.boundjid and p["type"] == "available"
            )
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [p for p in alice.presences.items if p["type"] == "subscribe"]
            assert alice.client_roster[b]["subscription"] == "from"
            assert bob.client_roster[a]["subscription"] == "to"


async def test_subscription_request_waits_for_offline_contact(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """RFC 6121 §3.1.3: a request to an offline contact is delivered when they come online."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            alice.send_presence_subscription(pto=b)
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            assert alice.client_roster[b]["pending_out"]
        async with clients(Client(server, b)) as (bob,):
            await bob.login()
            request = await next_matching(bob.presences, lambda p: p["type"] == "subscribe")
            assert request["from"] == a


async def test_subscription_to_unknown_account_is_refused(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            alice.send_presence_subscription(pto="ghost@localhost")
            refusal = await next_matching(alice.presences, lambda p: p["type"] == "unsubscribed")
            assert refusal["from"] == "ghost@localhost"
