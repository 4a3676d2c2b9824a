"""When each user last went offline, and with which status (XEP-0012)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from .db import Store, split_user
from .tables import LastSeen


class LastActivity(Store):
    async def get(self, user: str) -> tuple[float, str] | None:
        """``(unix time of logout, status text)``, to microsecond precision."""
        domain, username = split_user(user)
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(LastSeen.seen_at, LastSeen.status).where(
                        LastSeen.domain == domain, LastSeen.username == username
                    )
                )
            ).one_or_none()
        if row is None:
            return None
        seen_at, status = row
        return seen_at.timestamp(), status

    async def set(self, user: str, timestamp: float, status: str) -> None:
        domain, username = split_user(user)
        seen_at = datetime.fromtimestamp(timestamp, UTC)
        stmt = (
            self._conflict_insert(LastSeen)
            .values(domain=domain, username=username, seen_at=seen_at, status=status)
            .on_conflict_do_update(
                index_elements=["domain", "username"],
                set_={"seen_at": seen_at, "status": status},
            )
        )
        async with self._sessions.begin() as session:
            await session.execute(stmt)
