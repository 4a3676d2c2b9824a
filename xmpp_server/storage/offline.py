"""Messages held for a user who is offline (XEP-0160), delivered oldest first."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import Store, split_user, table_of
from .tables import OfflineMessage

_offline = table_of(OfflineMessage)
_OF_USER = (_offline.c.domain == bindparam("domain"), _offline.c.username == bindparam("username"))

# Constant statements compile once; the fetch runs at every login.
_FETCH = select(_offline.c.id, _offline.c.xml).where(*_OF_USER).order_by(_offline.c.id)
_COUNT = select(func.count()).select_from(_offline).where(*_OF_USER)


async def read_queue(
    conn: AsyncConnection, domain: str, username: str, limit: int | None = None
) -> list[tuple[int, str]]:
    """``(id, xml)`` oldest first, on a connection the caller holds."""
    stmt = _FETCH if limit is None else _FETCH.limit(limit)
    rows = await conn.execute(stmt, {"domain": domain, "username": username})
    return [(id_, xml) for id_, xml in rows]


class OfflineMessages(Store):
    async def push(self, user: str, xml: str, *, limit: int | None = None) -> int | None:
        """Store a message durably; the id only ever grows, so it orders the queue. With
        ``limit``, the queue is counted in the same transaction and None returned when full."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            if limit is not None:
                queued = await session.scalar(
                    select(func.count())
                    .select_from(OfflineMessage)
                    .where(OfflineMessage.domain == domain, OfflineMessage.username == username)
                )
                if (queued or 0) >= limit:
                    return None
            result = await session.execute(
                insert(OfflineMessage)
                .values(domain=domain, username=username, xml=xml)
                .returning(OfflineMessage.id)
            )
            return result.scalar_one()

    async def apply(
        self, rows: Sequence[tuple[str, str]], delete_ids: Sequence[int] = ()
    ) -> list[int]:
        """One transaction for a whole batch (group commit, see ``xmpp_server.mailbox``):
        insert ``(user, xml)`` rows and return their ids in the same order, delete rows by
        id. One commit, one fsync on SQLite, however many senders the batch serves."""
        async with self._engine.begin() as conn:
            ids: list[int] = []
            if rows:
                params = []
                for user, xml in rows:
                    domain, username = split_user(user)
                    params.append({"domain": domain, "username": username, "xml": xml})
                result = await conn.execute(
                    insert(_offline).returning(_offline.c.id, sort_by_parameter_order=True),
                    params,
                )
                ids = list(result.scalars())
            if delete_ids:
                await conn.execute(delete(_offline).where(_offline.c.id.in_(list(delete_ids))))
            return ids

    async def fetch(self, user: str, limit: int | None = None) -> list[tuple[int, str]]:
        """Oldest first; the messages stay stored until :meth:`delete`."""
        domain, username = split_user(user)
        async with self._connect() as conn:
            return await read_queue(conn, domain, username, limit)

    async def delete(self, user: str, ids: Sequence[int]) -> None:
        """Delete delivered messages; ids of other users' messages are ignored."""
        domain, username = split_user(user)
        if not ids:
            return
        async with self._sessions.begin() as session:
            await session.execute(
                delete(OfflineMessage).where(
                    OfflineMessage.domain == domain,
                    OfflineMessage.username == username,
                    OfflineMessage.id.in_(list(ids)),
                )
            )

    async def count(self, user: str) -> int:
        domain, username = split_user(user)
        async with self._connect() as conn:
            count = await conn.scalar(_COUNT, {"domain": domain, "username": username})
        return count or 0
