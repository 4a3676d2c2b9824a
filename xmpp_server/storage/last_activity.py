"""When each user last went offline, and with which status (XEP-0012)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .db import Store, split_user, table_of
from .tables import LastSeen

_last = table_of(LastSeen)

_GET = select(_last.c.seen_at, _last.c.status).where(
    _last.c.domain == bindparam("domain"), _last.c.username == bindparam("username")
)


class LastActivity(Store):
    def __init__(self, sessions: async_sessionmaker[AsyncSession], dialect: str) -> None:
        super().__init__(sessions, dialect)
        # Written at every logout: one Core upsert built once, so each logout skips the
        # ORM's DML set-up and reuses the compiled SQL.
        insert = self._conflict_insert(_last)
        self._set = insert.on_conflict_do_update(
            index_elements=["domain", "username"],
            set_={"seen_at": insert.excluded.seen_at, "status": insert.excluded.status},
        )

    async def get(self, user: str) -> tuple[float, str] | None:
        """``(unix time of logout, status text)``, to microsecond precision."""
        domain, username = split_user(user)
        async with self._connect() as conn:
            row = (await conn.execute(_GET, {"domain": domain, "username": username})).first()
        if row is None:
            return None
        seen_at, status = row
        return seen_at.timestamp(), status

    async def set(self, user: str, timestamp: float, status: str) -> None:
        domain, username = split_user(user)
        seen_at = datetime.fromtimestamp(timestamp, UTC)
        params = {"domain": domain, "username": username, "seen_at": seen_at, "status": status}
        async with self._engine.begin() as conn:
            await conn.execute(self._set, params)
