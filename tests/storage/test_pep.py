"""The PEP store's contract (XEP-0163 nodes, items, retention, expiry), on every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from xmpp_server.storage import Storage
from xmpp_server.storage.tables import PepItem, PepNode, user_tables

ALICE = "alice@example.org"
BOB = "bob@example.org"
AVATAR = "urn:xmpp:avatar:metadata"
STATUS = "urn:natter:status:0"
CONFIG: dict[str, Any] = {"pubsub#access_model": "presence", "pubsub#max_items": 1}


def payload(n: int) -> str:
    return f'<nick xmlns="http://jabber.org/protocol/nick">nick {n} ☃</nick>'


async def test_nodes_are_per_user_and_created_once(storage: Storage) -> None:
    pep = storage.pep
    assert await pep.get_node(ALICE, AVATAR) is None
    before = datetime.now(UTC)
    assert await pep.create_node(ALICE, AVATAR, CONFIG) is True
    assert await pep.create_node(ALICE, AVATAR, {"other": True}) is False
    node = await pep.get_node(ALICE, AVATAR)
    assert node is not None
    assert (node.node, node.config, node.affiliations) == (AVATAR, CONFIG, {})
    assert node.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= node.created_at <= datetime.now(UTC)
    assert await pep.get_node(BOB, AVATAR) is None
    await pep.create_node(ALICE, "b-node", {}, {BOB: "member"})
    assert [n.node for n in await pep.nodes(ALICE)] == ["b-node", AVATAR]
    assert await pep.nodes(BOB) == []


async def test_concurrent_creates_have_one_winner(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.pep.create_node(ALICE, AVATAR, {"n": n}) for n in range(5))
    )
    assert sorted(results) == [False] * 4 + [True]


async def test_configure_and_affiliations(storage: Storage) -> None:
    pep = storage.pep
    assert await pep.configure(ALICE, AVATAR, {"x": 1}) is False
    assert await pep.set_affiliations(ALICE, AVATAR, {BOB: "member"}) is False
    await pep.create_node(ALICE, AVATAR, CONFIG)
    for n in range(3):
        await pep.publish(ALICE, AVATAR, f"i{n}", payload(n), ALICE)
    assert await pep.configure(ALICE, AVATAR, {"pubsub#max_items": 2}, max_items=2) is True
    assert await pep.set_affiliations(ALICE, AVATAR, {BOB: "member"}) is True
    node = await pep.get_node(ALICE, AVATAR)
    assert node is not None
    assert (node.config, node.affiliations) == ({"pubsub#max_items": 2}, {BOB: "member"})
    assert [i.item_id for i in await pep.items(ALICE, AVATAR)] == ["i1", "i2"]


async def test_publish_orders_items_and_replaces_by_id(storage: Storage) -> None:
    pep = storage.pep
    await pep.create_node(ALICE, AVATAR, CONFIG)
    for n in range(3):
        assert await pep.publish(ALICE, AVATAR, f"i{n}", payload(n), f"{ALICE}/phone") == []
    items = await pep.items(ALICE, AVATAR)
    assert [(i.item_id, i.payload, i.publisher) for i in items] == [
        (f"i{n}", payload(n), f"{ALICE}/phone") for n in range(3)
    ]
    assert all(i.published_at.utcoffset() == timedelta(0) for i in items)
    await pep.publish(ALICE, AVATAR, "i0", payload(9), ALICE)
    assert [(i.item_id, i.payload) for i in await pep.items(ALICE, AVATAR)] == [
        ("i1", payload(1)),
        ("i2", payload(2)),
        ("i0", payload(9)),
    ]
    assert [i.item_id for i in await pep.items(ALICE, AVATAR, max_items=2)] == ["i2", "i0"]
    assert [i.item_id for i in await pep.items(ALICE, AVATAR, item_ids=["i0", "nope", "i1"])] == [
        "i1",
        "i0",
    ]
    assert await pep.items(BOB, AVATAR) == []
    assert await pep.count(ALICE, AVATAR) == 3


async def test_same_timestamp_keeps_publication_order(storage: Storage) -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(4):
        await storage.pep.publish(ALICE, AVATAR, f"i{n}", payload(n), ALICE, published_at=when)
    items = await storage.pep.items(ALICE, AVATAR, max_items=2)
    assert [i.item_id for i in items] == ["i2", "i3"]


async def test_retention_removes_the_oldest(storage: Storage) -> None:
    pep = storage.pep
    removed: list[str] = []
    for n in range(5):
        removed += await pep.publish(ALICE, AVATAR, f"i{n}", payload(n), ALICE, max_items=2)
    assert removed == ["i0", "i1", "i2"]
    assert [i.item_id for i in await pep.items(ALICE, AVATAR)] == ["i3", "i4"]
    assert await pep.publish(ALICE, AVATAR, "x", payload(0), ALICE, max_items=1) == ["i3", "i4"]


async def test_retract_and_purge(storage: Storage) -> None:
    pep = storage.pep
    for n in range(3):
        await pep.publish(ALICE, AVATAR, f"i{n}", payload(n), ALICE)
    await pep.publish(BOB, AVATAR, "i0", payload(0), BOB)
    assert await pep.retract(ALICE, AVATAR, ["i2", "nope", "i0"]) == ["i2", "i0"]
    assert await pep.retract(ALICE, AVATAR, ["i2"]) == []
    assert [i.item_id for i in await pep.items(ALICE, AVATAR)] == ["i1"]
    assert await pep.purge(ALICE, AVATAR) == 1
    assert await pep.items(ALICE, AVATAR) == []
    assert [i.item_id for i in await pep.items(BOB, AVATAR)] == ["i0"]


async def test_delete_node_deletes_its_items(storage: Storage) -> None:
    pep = storage.pep
    await pep.create_node(ALICE, AVATAR, CONFIG)
    await pep.create_node(ALICE, STATUS, CONFIG)
    await pep.publish(ALICE, AVATAR, "a", payload(1), ALICE)
    await pep.publish(ALICE, STATUS, "s", payload(2), ALICE)
    assert await pep.delete_node(ALICE, AVATAR) is True
    assert await pep.delete_node(ALICE, AVATAR) is False
    assert await pep.get_node(ALICE, AVATAR) is None
    assert await pep.items(ALICE, AVATAR) == []
    assert [i.item_id for i in await pep.items(ALICE, STATUS)] == ["s"]


async def test_expire_and_published_after(storage: Storage) -> None:
    pep = storage.pep
    now = datetime.now(UTC)
    old, new = now - timedelta(days=2), now - timedelta(minutes=1)
    await pep.publish(ALICE, STATUS, "old", payload(1), ALICE, published_at=old)
    await pep.publish(ALICE, STATUS, "new", payload(2), ALICE, published_at=new)
    await pep.publish(BOB, STATUS, "old", payload(3), BOB, published_at=old)
    await pep.publish(BOB, AVATAR, "old", payload(4), BOB, published_at=old)
    cutoff = now - timedelta(days=1)
    assert [i.item_id for i in await pep.items(ALICE, STATUS, published_after=cutoff)] == ["new"]
    assert await pep.expire(STATUS, cutoff) == 2
    assert [i.item_id for i in await pep.items(ALICE, STATUS)] == ["new"]
    assert await pep.items(BOB, STATUS) == []
    assert [i.item_id for i in await pep.items(BOB, AVATAR)] == ["old"]


async def test_tables_are_wiped_with_the_account(storage: Storage) -> None:
    assert PepNode in user_tables() and PepItem in user_tables()
