"""Group commit for the mailbox (the ``offline_messages`` table): one writer task batches the
inserts and deletes of every sender into one transaction.

Why: a message acknowledged to its sender must be in durable storage until the recipient's
client acknowledges it (docs/storage-modes.md). A transaction per message costs a commit (an
fsync on SQLite, a round trip on PostgreSQL) per message; a batch pays one for up to
``max_batch`` rows. Batches form by themselves: while one transaction runs, the next batch
fills, so a quiet server commits each message at once and a busy one commits many together.

Every operation gets a sequence number. A connection remembers the last number queued while
it handled a stanza and, before it acknowledges (XEP-0198 ``<a/>``, a resumption, the answer
to its next iq), waits until :attr:`Mailbox.committed` has reached it (:meth:`settle`).

A letter removed (its recipient acknowledged it) before its batch was taken is never
written; one removed while its batch is being written is deleted in a later batch. A write
that fails is retried until it succeeds; past ``max_backlog`` queued operations
:meth:`Mailbox.put` waits, which stops the senders' connections from reading (back-pressure,
never silent loss).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from xmpp_server.storage.offline import OfflineMessages

log = logging.getLogger("natterd.mailbox")

RETRY_FIRST, RETRY_MAX = 0.05, 5.0  # seconds between attempts while the database fails


@dataclass(eq=False, slots=True)
class Letter:
    """One message on its way into (and later out of) the mailbox table."""

    user: str  # the recipient's bare JID
    xml: str | Callable[[], str]  # the stored form, or how to make it when it is written
    seq: int
    state: Literal["queued", "writing", "stored", "dropped"] = "queued"
    id: int | None = None  # the row id, once stored
    remove_wanted: bool = False  # acknowledged while its batch was being written
    outstanding: int = 0  # live deliveries neither acknowledged nor lost yet


@dataclass(eq=False, slots=True)
class _Deletion:
    ids: list[int]
    seq: int


class Mailbox:
    """The writer; ``await start()`` before use, ``await stop()`` drains it."""

    def __init__(self, store: OfflineMessages, *, max_batch: int, max_backlog: int) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.queued = 0  # sequence number of the last operation queued
        self.committed = 0  # every operation up to this number is committed
        self._ops: deque[Letter | _Deletion] = deque()
        self._pending: dict[str, int] = {}  # user → letters queued or being written
        self._lengths: dict[str, int] = {}  # user → rows stored (cache; see queue_length)
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._commit = asyncio.Event()  # set and replaced at each commit
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- the senders' side ------------------------------------------------------------

    async def put(self, user: str, xml: str | Callable[[], str]) -> Letter:
        """Queue a row for ``user``; waits only while the backlog is over ``max_backlog``.
        ``xml`` may be a function, called only if the row is written: a message its
        recipient acknowledged before the batch was taken is never serialised for it."""
        while len(self._ops) >= self.max_backlog:
            self._space.clear()
            await self._space.wait()
        letter = Letter(user, xml, self._next())
        self._ops.append(letter)
        self._pending[user] = self._pending.get(user, 0) + 1
        if user in self._lengths:
            self._lengths[user] += 1
        self._wake.set()
        return letter

    def remove(self, letter: Letter) -> None:
        """The recipient's client acknowledged ``letter``: delete its row (or never write it)."""
        if letter.state == "queued":
            letter.state = "dropped"
            self._forget_length(letter.user)
        elif letter.state == "writing":
            letter.remove_wanted = True
        elif letter.state == "stored":
            assert letter.id is not None
            letter.state = "dropped"
            self._delete([letter.id], letter.user)

    def _delete(self, ids: list[int], user: str) -> None:
        self._ops.append(_Deletion(ids, self._next()))
        self._forget_length(user)
        self._wake.set()

    def _next(self) -> int:
        self.queued += 1
        return self.queued

    async def settle(self, seq: int) -> None:
        """Wait until every operation up to ``seq`` is committed."""
        while self.committed < seq:
            event = self._commit
            await event.wait()

    async def queue_length(self, user: str) -> int:
        """Rows stored or queued for ``user`` (for ``max_per_user``). Counted in the database
        once and then kept up to date; a deletion for the user makes it count again. It can
        be off by a batch while one is being committed: the limit is approximate."""
        length = self._lengths.get(user)
        if length is None:
            stored = await self.store.count(user)
            length = self._lengths[user] = stored + self._pending.get(user, 0)
        return length

    def _forget_length(self, user: str) -> None:
        self._lengths.pop(user, None)

    def forget_length(self, user: str) -> None:
        """Rows of ``user`` were deleted elsewhere (the offline flush, the quarantine)."""
        self._forget_length(user)

    # -- the writer -------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            log.error("mailbox: %d operations not written at shutdown", len(self._ops))
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            if not self._ops:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(0)  # what the same event-loop pass queues joins the batch
            batch = [self._ops.popleft() for _ in range(min(self.max_batch, len(self._ops)))]
            await self._write(batch)

    async def _write(self, batch: list[Letter | _Deletion]) -> None:
        letters: list[Letter] = []
        rows: list[tuple[str, str]] = []
        for op in batch:
            if not isinstance(op, Letter) or op.state != "queued":
                continue
            if not isinstance(op.xml, str):
                try:
                    op.xml = op.xml()
                except Exception:  # never expected; one bad message must not stop the writer
                    log.exception("mailbox: could not serialise a message for %s", op.user)
                    op.state = "dropped"
                    continue
            op.state = "writing"
            letters.append(op)
            rows.append((op.user, op.xml))
        deletions = [i for op in batch if isinstance(op, _Deletion) for i in op.ids]
        delay = RETRY_FIRST
        ids: list[int] = []
        while rows or deletions:
            try:
                ids = await self.store.apply(rows, deletions)
                break
            except Exception as exc:
                log.warning("mailbox: a batch of %d rows failed, retrying: %s", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        for letter, id_ in zip(letters, ids, strict=True):
            letter.id = id_
            letter.state = "stored"
            if letter.remove_wanted:
                letter.state = "dropped"
                self._delete([id_], letter.user)
        for op in batch:
            if isinstance(op, Letter):
                left = self._pending[op.user] - 1
                if left:
                    self._pending[op.user] = left
                else:
                    del self._pending[op.user]
        self.committed = max(self.committed, batch[-1].seq)
        event, self._commit = self._commit, asyncio.Event()
        event.set()
        if len(self._ops) < self.max_backlog:
            self._space.set()
