"""XEP-0198: acks, resumption after a cut connection, and nothing lost when it never comes back."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from sqlalchemy import text

from tests.e2e.harness import TIMEOUT, Client, add_user, clients, next_matching, running_server
from xmpp_server.connection import Connection
from xmpp_server.jid import JID
from xmpp_server.server import Server


def cut(client: Client) -> None:
    """Kill the TCP connection under the client without any XMPP goodbye."""
    sock = client.transport.get_extra_info("socket")
    sock.shutdown(socket.SHUT_RDWR)


async def detached(server: Server, jid: JID) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not any(c.detached and c.jid == jid for c in server.host.resumable.values()):
            await asyncio.sleep(0.02)


async def acked_by_client(server: Server, jid: JID) -> None:
    """Until ``jid``'s client acknowledged everything sent to it and the mailbox committed
    the deletions that follow."""
    session = server.host.router.session(jid)
    assert isinstance(session, Connection) and session.sm is not None
    async with asyncio.timeout(TIMEOUT):
        while session.sm.queue:
            await asyncio.sleep(0.02)
    mailbox = server.host.mailbox
    assert mailbox is not None
    while mailbox.committed < mailbox.queued:  # a commit may queue a deletion
        await mailbox.settle(mailbox.queued)


def bodies(client: Client) -> list[str]:
    return [m["body"] for m in client.messages.items if m["type"] == "chat"]


async def test_acks_count_only_handled_stanzas(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a, stream_management=True)) as (alice,):
            await alice.login()
            for i in range(20):
                alice.send_message(mto=b, mbody=f"m{i}", mtype="chat")
            async with asyncio.timeout(TIMEOUT):
                while len([s for s in alice.acked if s.name == "message"]) < 20:
                    # slixmpp asks before writing the stanza it counts; ask once more after.
                    alice.plugin["xep_0198"].request_ack()
                    await asyncio.sleep(0.05)
            # Acknowledged means stored: Bob is offline, so all 20 are in his offline store.
            assert await server.host.storage.offline.count(b) == 20


async def test_resumed_session_gets_everything_sent_meanwhile(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b, stream_management=True)) as (
            alice,
            bob,
        ):
            await alice.login()
            await bob.login()
            full = JID.parse(str(bob.boundjid))
            for i in range(5):
                alice.send_message(mto=full, mbody=f"before {i}", mtype="chat")
            await next_matching(bob.messages, lambda m: m["body"] == "before 4")
            cut(bob)
            await detached(server, full)
            for i in range(10):
                target = full if i % 2 else JID.parse(b)
                alice.send_message(mto=str(target), mbody=f"meanwhile {i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            # Held for the session, and in the mailbox table until Bob's client acks them.
            assert await server.host.storage.offline.count(b) >= 10
            bob.start()
            await bob.wait_until("session_resumed", TIMEOUT)
            await next_matching(bob.messages, lambda m: m["body"] == "meanwhile 9")
            await bob.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert sorted(bodies(bob)) == sorted(
                [f"before {i}" for i in range(5)] + [f"meanwhile {i}" for i in range(10)]
            )
            assert str(bob.boundjid) == str(full)
            async with asyncio.timeout(TIMEOUT):
                while await server.host.storage.offline.count(b) > 0:  # acked: deleted
                    bob.plugin["xep_0198"].request_ack()
                    await asyncio.sleep(0.05)


async def test_session_never_resumed_goes_to_offline_storage(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"c2s": {"resume_timeout": 0.5}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a), Client(server, b, stream_management=True)) as (
            alice,
            bob,
        ):
            await alice.login()
            await bob.login()
            full = JID.parse(str(bob.boundjid))
            cut(bob)
            await detached(server, full)
            for i in range(5):
                alice.send_message(mto=b, mbody=f"lost? {i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            async with asyncio.timeout(TIMEOUT):
                while await server.host.storage.offline.count(b) < 5:
                    await asyncio.sleep(0.05)
            bob.plugin["xep_0198"].sm_id = None  # forget the old session: a fresh login
        async with clients(Client(server, b)) as (bob_again,):
            await bob_again.login()
            for i in range(5):
                await next_matching(bob_again.messages, lambda m, i=i: m["body"] == f"lost? {i}")
            await bob_again.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert bodies(bob_again) == [f"lost? {i}" for i in range(5)]


async def test_thousand_offline_messages_in_order_then_deleted(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """1,000 messages to an offline user arrive in order, none missing or doubled; once the
    client acknowledged them they are gone from the database (ephemeral delivery)."""
    overrides = {"modules": {"offline": {"max_per_user": 2000}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            for i in range(1000):
                alice.send_message(mto=b, mbody=f"n{i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=60)
        assert await server.host.storage.offline.count(b) == 1000
        async with clients(Client(server, b, stream_management=True)) as (bob,):
            await bob.login()
            await next_matching(bob.messages, lambda m: m["body"] == "n999", timeout=60)
            await bob.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert bodies(bob) == [f"n{i}" for i in range(1000)]
            async with asyncio.timeout(TIMEOUT):
                while await server.host.storage.offline.count(b) > 0:
                    await asyncio.sleep(0.05)
        async with clients(Client(server, b)) as (bob_again,):
            await bob_again.login()
            await bob_again.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert bodies(bob_again) == []


async def test_session_end_keeps_what_a_client_never_confirmed(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """Messages written to a session that never acknowledged them are in the mailbox table
    all along and stay there when the session ends (the client closing, or the server
    stopping)."""
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        alice, bob = Client(server, a), Client(server, b, stream_management=True)
        async with clients(alice, bob):
            await alice.login()
            await bob.login()
            bob.transport.pause_reading()  # Bob's phone froze: no acks from now on
            for i in range(5):
                alice.send_message(mto=b, mbody=f"unconfirmed {i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert await server.host.storage.offline.count(b) == 5
            storage_url = server.host.config.storage.url
    # Bob's session is over: the five are in his offline store, not lost with the socket.
    from xmpp_server.storage import Storage

    storage = await Storage.open(storage_url)
    try:
        assert await storage.offline.count(b) == 5
    finally:
        await storage.close()


async def sql_count(server: Server, table: str) -> int:
    async with server.host.storage.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_ephemeral_mode_keeps_nothing_after_the_ack(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """WhatsApp mode: a message lives in the database only until the recipient's client
    acknowledged it, and is never archived (checked with SQL, not through our stores)."""
    overrides = {"modules": {"mam": {"mode": "ephemeral"}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            for i in range(10):
                alice.send_message(mto=b, mbody=f"vanish {i}", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
        assert await sql_count(server, "offline_messages") == 10
        async with clients(Client(server, b, stream_management=True)) as (bob,):
            await bob.login()
            await next_matching(bob.messages, lambda m: m["body"] == "vanish 9")
            async with asyncio.timeout(TIMEOUT):
                while await sql_count(server, "offline_messages") != 0:
                    bob.plugin["xep_0198"].request_ack()  # nudges the server's <r/> round trip
                    await asyncio.sleep(0.05)
            # Live messages are not kept either.
            async with clients(Client(server, a)) as (alice,):
                await alice.login()
                alice.send_message(mto=b, mbody="live", mtype="chat")
                await next_matching(bob.messages, lambda m: m["body"] == "live")
                # Kept in the mailbox only until Bob's client acknowledged it.
                await acked_by_client(server, JID.parse(str(bob.boundjid)))
        assert await sql_count(server, "offline_messages") == 0
        assert await sql_count(server, "archive") == 0
