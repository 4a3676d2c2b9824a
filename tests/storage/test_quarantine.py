"""A stored message that cannot be read back is moved aside, on both stores."""

from __future__ import annotations

from xmpp_server.storage import Storage

ALICE = "alice@example.org"


async def test_set_aside_moves_the_row_and_leaves_the_rest(storage: Storage) -> None:
    bad = await storage.offline.push(ALICE, "<message><b}x/></message>")
    good = await storage.offline.push(ALICE, "<message id='ok'/>")
    assert bad is not None and good is not None
    await storage.quarantine.set_aside(ALICE, "offline_messages", bad, "<b}x/>", "not well-formed")
    assert [row[0] for row in await storage.offline.fetch(ALICE)] == [good]
    [moved] = await storage.quarantine.list(ALICE)
    assert (moved.owner, moved.source, moved.source_id) == (ALICE, "offline_messages", bad)
    assert moved.reason == "not well-formed"
    assert await storage.quarantine.list("bob@example.org") == []
