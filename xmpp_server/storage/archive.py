"""The message archive (XEP-0313) and archiving preferences (XEP-0441).

An archive belongs to an owner bare JID: an account, or later a room. Items are in
``(timestamp, id)`` order, which is arrival order: the server stamps the time as it archives,
and the id breaks ties between messages of the same instant. Queries are keyset-paged on that
pair (a page deep into a large archive costs what the first page costs), and every reference
to an item (RSM ``after``/``before``, ``after-id``, ``before-id``, ``ids``) is a stanza-id that
must exist in the owner's archive, or :class:`UnknownArchiveId` is raised.

Full-text search runs on PostgreSQL's ``to_tsvector('simple', body)`` GIN index or on SQLite's
FTS5 table ``archive_fts`` (migration 0002). Both take the words of the query and find items
containing all of them; operators and punctuation in the query have no special meaning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    delete,
    func,
    insert,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy import text as sql_text
from sqlalchemy.ext.asyncio import AsyncSession

from .db import Store, split_user
from .tables import ARCHIVE_FTS_TABLE, ArchivedMessage, ArchivePreference, Base

Direction = Literal["in", "out"]
DefaultMode = Literal["always", "never", "roster"]
DEFAULT_MODES: tuple[DefaultMode, ...] = ("always", "never", "roster")
PURGE_BATCH = 5000  # rows per DELETE, so a large purge never holds a long write lock
_WORD = re.compile(r"[^\W_]+")  # what FTS5's unicode61 tokenizer keeps: letters and digits

A = ArchivedMessage
ARCHIVE_TABLE = Base.metadata.tables[ArchivedMessage.__tablename__]
Key = tuple[datetime, int]


class UnknownArchiveId(LookupError):
    """A stanza-id the query refers to is not in the owner's archive (XEP-0313 item-not-found)."""

    def __init__(self, stanza_id: str) -> None:
        super().__init__(f"no archived message with id {stanza_id!r}")
        self.stanza_id = stanza_id


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """A message to archive; ``with_jid`` is the peer, bare or full (the resource is kept)."""

    stanza_id: str
    with_jid: str
    direction: Direction
    timestamp: datetime
    xml: str
    body: str | None = None


@dataclass(frozen=True, slots=True)
class ArchiveItem:
    stanza_id: str
    with_jid: str  # the peer's full JID when it was archived with a resource
    direction: Direction
    timestamp: datetime  # UTC, aware
    xml: str
    row_id: int = 0  # the archive table's id: what sets an unreadable row aside


@dataclass(frozen=True, slots=True)
class ArchivePage:
    """One page in chronological order, with what an RSM ``<set/>`` reply needs."""

    items: list[ArchiveItem]
    first: str | None  # stanza-id of the oldest item of the page
    last: str | None  # stanza-id of the newest
    complete: bool  # nothing further in the paging direction
    count: int | None  # items matching the filters, over all pages (None: not counted)
    index: int | None  # position of ``first`` among them (0 = the oldest match)


@dataclass(frozen=True, slots=True)
class ArchivePrefs:
    default: DefaultMode
    always: tuple[str, ...] = ()
    never: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.default not in DEFAULT_MODES:
            raise ValueError(f"archive default must be always/never/roster, not {self.default!r}")


def _row(owner: tuple[str, str], entry: ArchiveEntry) -> dict[str, Any]:
    bare, _, resource = entry.with_jid.partition("/")
    return {
        "domain": owner[0],
        "username": owner[1],
        "stanza_id": entry.stanza_id,
        "with_jid": bare,
        "with_resource": resource or None,
        "direction": entry.direction,
        "timestamp": entry.timestamp,
        "xml": entry.xml,
        "body": entry.body,
    }


def fts5_query(words: str) -> str | None:
    """An FTS5 MATCH expression requiring every word, each quoted so nothing is an operator."""
    found = _WORD.findall(words)
    return " ".join(f'"{word}"' for word in found) if found else None


class Archive(Store):
    async def append(
        self,
        owner: str,
        stanza_id: str,
        with_jid: str,
        direction: Direction,
        timestamp: datetime,
        xml: str,
        body: str | None = None,
    ) -> int:
        """Archive one message; returns its row id. ``stanza_id`` must be new to the owner."""
        entry = ArchiveEntry(stanza_id, with_jid, direction, timestamp, xml, body)
        async with self._sessions.begin() as session:
            result = await session.execute(
                insert(A).values(**_row(split_user(owner), entry)).returning(A.id)
            )
            return result.scalar_one()

    async def append_batch(self, entries: Sequence[tuple[str, ArchiveEntry]]) -> None:
        """Archive messages of several owners in one transaction (the module's write-behind).
        Idempotent: a copy whose stanza-id the owner's archive already has is skipped, so a
        batch retried after a commit whose answer was lost is not stored twice."""
        rows = [_row(split_user(owner), entry) for owner, entry in entries]
        if rows:
            stmt = self._conflict_insert(ARCHIVE_TABLE).on_conflict_do_nothing(
                index_elements=["domain", "username", "stanza_id"]
            )
            async with self._sessions.begin() as session:
                await session.execute(stmt, rows)

    async def append_many(self, owner: str, entries: Iterable[ArchiveEntry]) -> None:
        """Archive many messages in one transaction and one executemany (imports, tests)."""
        key = split_user(owner)
        rows = [_row(key, entry) for entry in entries]
        if rows:
            async with self._sessions.begin() as session:
                # A Core insert on the table: the ORM's bulk path costs 3x as much per row.
                await session.execute(insert(ARCHIVE_TABLE), rows)

    async def query(
        self,
        owner: str,
        *,
        with_jid: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        after_id: str | None = None,
        before_id: str | None = None,
        ids: Sequence[str] | None = None,
        text: str | None = None,
        after: str | None = None,
        before: str | None = None,
        index: int | None = None,
        limit: int = 50,
        count_limit: int | None = None,
    ) -> ArchivePage:
        """One page of the owner's archive.

        Filters (they define the result set and its ``count``): ``with_jid`` (a bare JID
        matches every resource), ``start``/``end`` (inclusive), ``after_id``/``before_id``
        (exclusive), ``ids``, ``text`` (every word). Paging (RSM): ``after`` = the page after
        that item; ``before`` = the page before it, ``""`` = the last page; ``index`` = the
        page starting at that position; none = the first page. Items are always oldest first.

        Counting costs a scan of every match, far more than the page on a large archive: with
        ``count_limit``, ``count`` (and ``index`` where it needs counting) is None when more
        than that many items match.
        """
        if limit < 0 or (index is not None and index < 0):
            raise ValueError("limit and index must not be negative")
        if after is not None and before is not None:
            raise ValueError("page after or before an item, not both")
        domain, username = split_user(owner)
        refs = [r for r in (after_id, before_id, after, before) if r] + list(ids or ())
        async with self._sessions() as session:
            keys = await self._keys(session, domain, username, refs)
            filters = self._filters(keys, with_jid, start, end, after_id, before_id, ids, text)
            if filters is None:
                return ArchivePage([], None, None, True, 0, None)
            where = [A.domain == domain, A.username == username, *filters]
            cursor = keys[after] if after else keys[before] if before else None
            count, preceding = await self._count(session, where, cursor, bool(after), count_limit)

            page = select(A).where(*where)
            backwards = before is not None
            if cursor is not None:
                page = page.where(_key() > cursor if after else _key() < cursor)
            if backwards:
                page = page.order_by(A.timestamp.desc(), A.id.desc())
            else:
                page = page.order_by(A.timestamp, A.id)
            if index is not None and after is None and before is None:
                page = page.offset(index)
            rows = list(await session.scalars(page.limit(limit + 1)))

        more = len(rows) > limit
        rows = rows[:limit]
        if backwards:
            rows.reverse()
        items = [_item(row) for row in rows]
        if not items:
            return ArchivePage([], None, None, not more, count, None)
        first_index: int | None = None
        if not backwards and not after:
            first_index = index or 0
        elif count is not None:
            # preceding: matches up to the cursor; for <before/> without one, all of them.
            first_index = preceding + (0 if after else -len(items))
        return ArchivePage(
            items, items[0].stanza_id, items[-1].stanza_id, not more, count, first_index
        )

    async def _count(
        self,
        session: AsyncSession,
        where: list[ColumnElement[bool]],
        cursor: Key | None,
        forwards: bool,
        limit: int | None,
    ) -> tuple[int | None, int]:
        """(matches or None past ``limit``, matches up to the cursor) in one index scan."""
        matches = select(A.timestamp, A.id).where(*where)
        if limit is not None:
            matches = matches.limit(limit + 1)
        sub = matches.subquery()
        key = tuple_(sub.c.timestamp, sub.c.id)
        counts: list[Any] = [func.count()]
        if cursor is not None:
            counts.append(func.count().filter(key <= cursor if forwards else key < cursor))
        row = (await session.execute(select(*counts).select_from(sub))).one()
        total = int(row[0])
        preceding = int(row[1]) if cursor is not None else total
        if limit is not None and total > limit:
            return None, preceding
        return total, preceding

    async def _keys(
        self, session: AsyncSession, domain: str, username: str, stanza_ids: Sequence[str]
    ) -> dict[str, Key]:
        """The ordering key of each referenced item; raises UnknownArchiveId for a missing one."""
        if not stanza_ids:
            return {}
        wanted = set(stanza_ids)
        rows = await session.execute(
            select(A.stanza_id, A.timestamp, A.id).where(
                A.domain == domain, A.username == username, A.stanza_id.in_(wanted)
            )
        )
        keys = {sid: (ts, id_) for sid, ts, id_ in rows}
        for sid in stanza_ids:
            if sid not in keys:
                raise UnknownArchiveId(sid)
        return keys

    def _filters(
        self,
        keys: dict[str, Key],
        with_jid: str | None,
        start: datetime | None,
        end: datetime | None,
        after_id: str | None,
        before_id: str | None,
        ids: Sequence[str] | None,
        words: str | None,
    ) -> list[ColumnElement[bool]] | None:
        """The conditions of the query's filters; None when no item can match."""
        where: list[ColumnElement[bool]] = []
        if with_jid is not None:
            bare, _, resource = with_jid.partition("/")
            where.append(A.with_jid == bare)
            if resource:
                where.append(A.with_resource == resource)
        if start is not None:
            where.append(A.timestamp >= start)
        if end is not None:
            where.append(A.timestamp <= end)
        if after_id:
            where.append(_key() > keys[after_id])
        if before_id:
            where.append(_key() < keys[before_id])
        if ids is not None:
            where.append(A.stanza_id.in_(set(ids)))
        if words is not None and words.strip():
            match = self._match(words)
            if match is None:
                return None  # only punctuation: no word to find
            where.append(match)
        return where

    def _match(self, words: str) -> ColumnElement[bool] | None:
        if self._dialect == "postgresql":
            # Spelled exactly like the index expression, with literal configurations, so the
            # planner can use the GIN index.
            simple: ColumnElement[Any] = literal_column("'simple'::regconfig")
            vector = func.to_tsvector(simple, A.body)
            return vector.bool_op("@@")(func.plainto_tsquery(simple, words))
        query = fts5_query(words)
        if query is None:
            return None
        matching = sql_text(
            f"SELECT rowid FROM {ARCHIVE_FTS_TABLE} WHERE {ARCHIVE_FTS_TABLE} MATCH :words"
        ).bindparams(words=query)
        return A.id.in_(matching.columns(rowid=A.id.type))

    async def metadata(self, owner: str) -> tuple[ArchiveItem, ArchiveItem] | None:
        """The oldest and the newest item, or None for an empty archive."""
        domain, username = split_user(owner)
        stmt = select(A).where(A.domain == domain, A.username == username)
        async with self._sessions() as session:
            first = await session.scalar(stmt.order_by(A.timestamp, A.id).limit(1))
            last = await session.scalar(stmt.order_by(A.timestamp.desc(), A.id.desc()).limit(1))
        if first is None or last is None:
            return None
        return _item(first), _item(last)

    async def newest_timestamp(self) -> datetime | None:
        """The latest timestamp in any archive (the ``timestamp`` index answers it)."""
        async with self._sessions() as session:
            return await session.scalar(select(func.max(A.timestamp)))

    async def delete(self, owner: str, stanza_ids: Sequence[str]) -> int:
        """Delete the given items of the owner; returns how many there were."""
        domain, username = split_user(owner)
        if not stanza_ids:
            return 0
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(A).where(
                    A.domain == domain, A.username == username, A.stanza_id.in_(set(stanza_ids))
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def purge(self, owner: str | None = None, *, older_than: datetime) -> int:
        """Delete items archived before ``older_than`` (of one owner, or of all); returns how
        many. Works in batches, each its own transaction, so writers are never held up long."""
        where = [A.timestamp < older_than]
        if owner is not None:
            domain, username = split_user(owner)
            where += [A.domain == domain, A.username == username]
        total = 0
        while True:
            batch = select(A.id).where(*where).limit(PURGE_BATCH).scalar_subquery()
            async with self._sessions.begin() as session:
                result = await session.execute(delete(A).where(A.id.in_(batch)))
            deleted = int(result.rowcount)  # type: ignore[attr-defined]
            total += deleted
            if deleted < PURGE_BATCH:
                return total

    async def prefs_owners(self) -> set[str]:
        """Every user who stored preferences (the others need no lookup)."""
        P = ArchivePreference
        async with self._sessions() as session:
            rows = await session.execute(select(P.username, P.domain))
            return {f"{username}@{domain}" for username, domain in rows}

    async def get_prefs(self, owner: str) -> ArchivePrefs | None:
        """The owner's stored preferences; None when they never set any."""
        domain, username = split_user(owner)
        async with self._sessions() as session:
            row = await session.get(ArchivePreference, (domain, username))
        if row is None:
            return None
        return ArchivePrefs(
            row.default_mode,  # type: ignore[arg-type]  # the CHECK constraint guarantees it
            tuple(row.always),
            tuple(row.never),
        )

    async def set_prefs(self, owner: str, prefs: ArchivePrefs) -> None:
        domain, username = split_user(owner)
        values = {
            "default_mode": prefs.default,
            "always": list(prefs.always),
            "never": list(prefs.never),
        }
        stmt = self._conflict_insert(ArchivePreference).values(
            domain=domain, username=username, **values
        )
        async with self._sessions.begin() as session:
            await session.execute(
                stmt.on_conflict_do_update(index_elements=["domain", "username"], set_=values)
            )


def _key() -> Any:
    return tuple_(A.timestamp, A.id)


def _item(row: ArchivedMessage) -> ArchiveItem:
    jid = f"{row.with_jid}/{row.with_resource}" if row.with_resource else row.with_jid
    return ArchiveItem(
        row.stanza_id,
        jid,
        row.direction,  # type: ignore[arg-type]  # the CHECK constraint guarantees it
        row.timestamp,
        row.xml,
        row.id,
    )
