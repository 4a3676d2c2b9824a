"""Stored messages that could not be read back, set aside (see ``QuarantinedRow``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select

from .db import Store, split_user
from .tables import ArchivedMessage, OfflineMessage, QuarantinedRow

log = logging.getLogger("natterd.storage")

_SOURCES: dict[str, type[OfflineMessage] | type[ArchivedMessage]] = {
    "offline_messages": OfflineMessage,
    "archive": ArchivedMessage,
}


@dataclass(frozen=True, slots=True)
class Quarantined:
    owner: str
    source: str
    source_id: int
    xml: str
    reason: str
    created_at: datetime


class Quarantine(Store):
    async def set_aside(
        self, owner: str, source: str, source_id: int, xml: str, reason: str
    ) -> bool:
        """Move row ``source_id`` of table ``source`` (owned by ``owner``) here, in one
        transaction, and log it once: the row stops blocking its queue or page. False when the
        row is no longer there (another reader set it aside first): nothing is done then, so
        two readers meeting the same bad row keep one copy and one log line."""
        model = _SOURCES[source]
        domain, username = split_user(owner)
        async with self._sessions.begin() as session:
            deleted = await session.execute(
                delete(model).where(
                    model.domain == domain, model.username == username, model.id == source_id
                )
            )
            if not deleted.rowcount:  # type: ignore[attr-defined]
                return False
            await session.execute(
                insert(QuarantinedRow).values(
                    domain=domain,
                    username=username,
                    source=source,
                    source_id=source_id,
                    xml=xml,
                    reason=reason[:1000],
                )
            )
        log.warning("set aside unreadable %s row %d of %s: %s", source, source_id, owner, reason)
        return True

    async def list(self, owner: str | None = None) -> list[Quarantined]:
        stmt = select(QuarantinedRow).order_by(QuarantinedRow.id)
        if owner is not None:
            domain, username = split_user(owner)
            stmt = stmt.where(QuarantinedRow.domain == domain, QuarantinedRow.username == username)
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [
            Quarantined(
                f"{r.username}@{r.domain}", r.source, r.source_id, r.xml, r.reason, r.created_at
            )
            for r in rows
        ]
