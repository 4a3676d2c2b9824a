"""Messages held for a user who is offline (XEP-0160), delivered oldest first."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, insert, select

from .db import Store, split_user
from .tables import OfflineMessage


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

    async def fetch(self, user: str, limit: int | None = None) -> list[tuple[int, str]]:
        """Oldest first; the messages stay stored until :meth:`delete`."""
        domain, username = split_user(user)
        stmt = (
            select(OfflineMessage.id, OfflineMessage.xml)
            .where(OfflineMessage.domain == domain, OfflineMessage.username == username)
            .order_by(OfflineMessage.id)
            .limit(limit)
        )
        async with self._sessions() as session:
            return [(id_, xml) for id_, xml in await session.execute(stmt)]

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
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(OfflineMessage)
                .where(OfflineMessage.domain == domain, OfflineMessage.username == username)
            )
            return count or 0
