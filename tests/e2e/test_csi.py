"""XEP-0352 client state indication: an inactive client gets messages at once, presence
updates only when it becomes active again (the latest per contact), chat states never."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.befriend import befriend
from tests.e2e.harness import (
    DOMAIN,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)


def csi_client(client: Client) -> Client:
    client.register_plugin("xep_0352")
    client.register_plugin("xep_0085")
    client.chatstates = Mailbox()
    client.add_event_handler("chatstate", client.chatstates.put_nowait)
    return client


async def round_trip(client: Client) -> None:
    """Everything the server had for ``client`` before this returns has arrived."""
    await client.plugin["xep_0199"].ping(DOMAIN, timeout=10)


def statuses(client: Client, sender: str, since: int) -> list[str]:
    return [
        str(p["status"])
        for p in client.presences.items[since:]
        if p["from"].bare == sender and p["type"] in ("available", "away", "xa", "dnd", "chat")
    ]


async def test_inactive_client_gets_messages_but_not_presence_or_chat_states(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(csi_client(Client(server, a)), csi_client(Client(server, b))) as (
            alice,
            bob,
        ):
            await alice.login()
            await bob.login()
            await round_trip(bob)
            assert bob.plugin["xep_0352"].enabled  # the server offered <csi/>
            await befriend(alice, bob)
            await round_trip(bob)

            bob.plugin["xep_0352"].send_inactive()
            await round_trip(bob)
            since = len(bob.presences.items)
            for n in (1, 2, 3):
                alice.send_presence(pshow="away", pstatus=f"status {n}")
            composing = alice.make_message(mto=b, mtype="chat")
            composing["chat_state"] = "composing"
            composing.send()
            alice.send_message(mto=b, mbody="wake up", mtype="chat")

            got = await next_matching(bob.messages, lambda m: m["body"] == "wake up")
            assert got["from"].bare == a
            await round_trip(alice)
            await round_trip(bob)
            assert statuses(bob, a, since) == []
            assert bob.chatstates.items == []

            bob.plugin["xep_0352"].send_active()
            latest = await next_matching(
                bob.presences, lambda p: p["status"] == "status 3", since=since
            )
            assert latest["from"].bare == a
            await round_trip(bob)
            await asyncio.sleep(0.2)
            assert statuses(bob, a, since) == ["status 3"]
            assert bob.chatstates.items == []

            # Active again: chat states and presence flow as usual.
            composing = alice.make_message(mto=b, mtype="chat")
            composing["chat_state"] = "paused"
            composing.send()
            await next_matching(bob.chatstates, lambda m: m["chat_state"] == "paused")
            alice.send_presence(pstatus="status 4")
            await next_matching(bob.presences, lambda p: p["status"] == "status 4")


async def test_csi_nonza_without_the_module_is_a_stream_error(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"csi": {"enabled": False}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        b = await add_user(server, "bob")
        async with clients(csi_client(Client(server, b))) as (bob,):
            await bob.login()
            await round_trip(bob)
            assert not bob.plugin["xep_0352"].enabled
            bob.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>")
            error = await next_matching(bob.stream_errors, lambda _: True)
            assert error["condition"] == "unsupported-stanza-type"
