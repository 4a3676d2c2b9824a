"""An unreadable offline row never blocks the flush at login (issue 13, defect 1, offline side).

Rows stored before natterd refused ill-formed XML (``<b}x/>``, say) are inserted directly.
Before: the flush raised at the bad row, nothing after it was delivered and nothing was
deleted, at every login. Now the bad row is set aside in the quarantine table (logged once),
the rest arrive in order and are deleted once acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.e2e.harness import TIMEOUT, Client, add_user, clients, next_matching, running_server


def chat(body: str) -> str:
    return (
        "<message xmlns='jabber:client' from='alice@localhost/x' to='bob@localhost' "
        f"type='chat'><body>{body}</body></message>"
    )


async def test_unreadable_row_is_set_aside_and_the_rest_delivered(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        await add_user(server, "alice")
        b = await add_user(server, "bob")
        offline = server.host.storage.offline
        await offline.push(b, chat("first"))
        bad = await offline.push(b, "<message to='bob@localhost' type='chat'><b}x/></message>")
        await offline.push(b, chat("second"))
        await offline.push(b, "<message type='chat'><body>unclosed</message>")
        await offline.push(b, chat("third"))
        with caplog.at_level(logging.WARNING):
            async with clients(Client(server, b, stream_management=True)) as (bob,):
                await bob.login()
                await next_matching(bob.messages, lambda m: m["body"] == "third")
                await bob.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
                bodies = [m["body"] for m in bob.messages.items if m["type"] == "chat"]
                assert bodies == ["first", "second", "third"]
                async with asyncio.timeout(TIMEOUT):
                    while await offline.count(b) > 0:  # delivered rows deleted once acked
                        bob.plugin["xep_0198"].request_ack()
                        await asyncio.sleep(0.05)
        set_aside = await server.host.storage.quarantine.list(b)
        assert [(q.source, q.source_id) for q in set_aside][0] == ("offline_messages", bad)
        assert len(set_aside) == 2
        logged = [r for r in caplog.records if "set aside unreadable" in r.getMessage()]
        assert len(logged) == 2  # once per row
        async with clients(Client(server, b)) as (bob_again,):
            await bob_again.login()
            await bob_again.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            assert [m["body"] for m in bob_again.messages.items if m["type"] == "chat"] == []
        assert len(await server.host.storage.quarantine.list(b)) == 2
