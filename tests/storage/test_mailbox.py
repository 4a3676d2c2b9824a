"""The mailbox's group commit over a real store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from xmpp_server.mailbox import Mailbox
from xmpp_server.storage import Storage

BOB = "bob@example.org"


@pytest.fixture
async def mailbox(storage: Storage) -> AsyncIterator[Mailbox]:
    box = Mailbox(storage.offline, max_batch=100, max_backlog=1000)
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


async def test_many_senders_few_commits_every_row_in_order(
    storage: Storage, mailbox: Mailbox
) -> None:
    commits = 0
    apply = storage.offline.apply

    async def counting(*args: object) -> list[int]:
        nonlocal commits
        commits += 1
        return await apply(*args)  # type: ignore[arg-type]

    storage.offline.apply = counting  # type: ignore[method-assign]
    letters = await asyncio.gather(*(mailbox.put(BOB, f"<message id='{i}'/>") for i in range(250)))
    await mailbox.settle(mailbox.queued)
    rows = await storage.offline.fetch(BOB)
    assert [xml for _, xml in rows] == [f"<message id='{i}'/>" for i in range(250)]
    assert [letter.id for letter in letters] == [id_ for id_, _ in rows]
    assert commits <= 5  # 250 rows, batches of at most 100: not one commit each


async def test_acknowledged_before_its_batch_is_never_written(
    storage: Storage, mailbox: Mailbox
) -> None:
    kept = await mailbox.put(BOB, "<message id='kept'/>")
    gone = await mailbox.put(BOB, "<message id='gone'/>")
    mailbox.remove(gone)  # the recipient acked in the same event-loop pass
    await mailbox.settle(mailbox.queued)
    assert gone.state == "dropped" and gone.id is None
    assert [id_ for id_, _ in await storage.offline.fetch(BOB)] == [kept.id]
    mailbox.remove(kept)  # acked after it was stored: deleted in a later batch
    await mailbox.settle(mailbox.queued)
    assert await storage.offline.fetch(BOB) == []


async def test_failed_writes_are_retried_and_senders_wait_past_the_backlog(
    storage: Storage,
) -> None:
    box = Mailbox(storage.offline, max_batch=10, max_backlog=20)
    failures = 3
    apply = storage.offline.apply

    async def flaky(*args: object) -> list[int]:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("database away")
        return await apply(*args)  # type: ignore[arg-type]

    storage.offline.apply = flaky  # type: ignore[method-assign]
    for i in range(20):
        await box.put(BOB, f"<message id='{i}'/>")
    blocked = asyncio.ensure_future(box.put(BOB, "<message id='20'/>"))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # back-pressure: the backlog is full and nothing is written
    await box.start()
    try:
        await asyncio.wait_for(blocked, 10)
        await asyncio.wait_for(box.settle(box.queued), 10)
    finally:
        await box.stop()
    assert failures == 0
    assert len(await storage.offline.fetch(BOB)) == 21
