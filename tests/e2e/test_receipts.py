"""The ticks: XEP-0184 receipts and XEP-0333 displayed markers with slixmpp's plugins.

They need no server code: they are messages, routed like any other, stored when the sender
went offline (so it learns of them at its next login) and carbon-copied to the sender's other
devices. Chat states (XEP-0085) are the exception: never stored.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from tests.e2e.befriend import befriend
from tests.e2e.harness import Client, Mailbox, add_user, clients, next_matching, running_server
from tests.e2e.test_carbons import CarbonsClient

C = TypeVar("C", bound=Client)


def ticking(client: C) -> C:
    """Receipts requested on every message sent, and answered (slixmpp's auto_ack); the
    ticks that arrive (bodiless, so not 'message' events) are kept in ``client.ticks``."""
    client.register_plugin("xep_0184", {"auto_request": True})
    client.register_plugin("xep_0333")
    client.ticks = Mailbox()
    client.add_event_handler("receipt_received", client.ticks.put_nowait)
    client.add_event_handler("marker_displayed", client.ticks.put_nowait)
    return client


def markable(client: Client, to: str, body: str) -> str:
    message = client.make_message(mto=to, mbody=body, mtype="chat")
    message["id"] = client.new_id()
    message["markable"] = True
    message.send()
    return str(message["id"])


async def test_receipt_and_marker_reach_all_of_the_senders_devices(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            ticking(CarbonsClient(server, f"{a}/phone")),
            ticking(CarbonsClient(server, f"{a}/laptop")),
            ticking(Client(server, b)),
        ) as (phone, laptop, bob):
            await phone.login_with_carbons()
            await laptop.login_with_carbons()
            await bob.login()
            await befriend(phone, bob)

            msg_id = markable(phone, b, "did you get this?")
            got = await next_matching(bob.messages, lambda m: m["body"] == "did you get this?")
            assert got["request_receipt"] and got["id"] == msg_id
            # ✓: bob's client acknowledged it automatically.
            receipt = await next_matching(phone.ticks, lambda m: m["receipt"] == msg_id)
            assert receipt["from"] == bob.boundjid
            # ✓✓ (read): bob's client says it was displayed.
            bob.plugin["xep_0333"].send_marker(got["from"], msg_id, "displayed", mtype="chat")
            marker = await next_matching(phone.ticks, lambda m: m["displayed"]["id"] == msg_id)
            assert marker["from"] == bob.boundjid

            # The laptop saw the message go out and both ticks come in.
            await next_matching(laptop.sent_copies, lambda m: m["carbon_sent"]["id"] == msg_id)
            await next_matching(
                laptop.received_copies, lambda m: m["carbon_received"]["receipt"] == msg_id
            )
            await next_matching(
                laptop.received_copies,
                lambda m: m["carbon_received"]["displayed"]["id"] == msg_id,
            )


async def test_ticks_wait_for_an_offline_sender(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(ticking(Client(server, f"{a}/phone"))) as (alice,):
            await alice.login()
            msg_id = markable(alice, b, "see you tomorrow")
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
        # Bob comes online after Alice left: his ticks go to her offline storage.
        async with clients(ticking(Client(server, b))) as (bob,):
            await bob.login()
            got = await next_matching(bob.messages, lambda m: m["body"] == "see you tomorrow")
            assert got["from"] == f"{a}/phone"
            bob.plugin["xep_0333"].send_marker(got["from"], msg_id, "displayed", mtype="chat")
            async with asyncio.timeout(10):
                while await server.host.storage.offline.count(a) < 2:
                    await asyncio.sleep(0.05)
        async with clients(ticking(Client(server, f"{a}/phone"))) as (alice,):
            await alice.login()
            receipt = await next_matching(alice.ticks, lambda m: m["receipt"] == msg_id)
            marker = await next_matching(alice.ticks, lambda m: m["displayed"]["id"] == msg_id)
            for tick in (receipt, marker):
                assert tick["from"] == f"{b}/{bob.boundjid.resource}"
                assert tick["delay"]["stamp"] is not None
            # Delivered rows are deleted just after they were written (no stream management).
            async with asyncio.timeout(10):
                while await server.host.storage.offline.count(a) != 0:
                    await asyncio.sleep(0.05)


async def test_chat_state_to_offline_user_is_not_stored(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, a)) as (alice,):
            alice.register_plugin("xep_0085")
            await alice.login()
            typing = alice.make_message(mto=b, mtype="chat")
            typing["chat_state"] = "composing"
            typing.send()
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)
            assert await server.host.storage.offline.count(b) == 0
        async with clients(Client(server, b)) as (bob,):
            bob.register_plugin("xep_0085")
            bob.chat_states = Mailbox()
            bob.add_event_handler("chatstate", bob.chat_states.put_nowait)
            await bob.login()
            await bob.plugin["xep_0199"].ping("localhost", timeout=10)
            assert not [m for m in bob.messages.items if m["from"].bare == a]
            assert not [m for m in bob.chat_states.items if m["from"].bare == a]
