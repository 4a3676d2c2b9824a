"""Persistent Multi-User Chat rooms (XEP-0045): configuration, subject and affiliations.

Only what must survive a restart is here; occupants and roles live in the MUC module's memory.
JIDs arrive normalised: storage compares them byte for byte. A room's configuration is opaque
JSON that the MUC module owns.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .db import Store
from .errors import RoomNotFound
from .tables import MucAffiliation, MucRoom

AFFILIATIONS = frozenset({"owner", "admin", "member", "outcast"})
NONE = "none"  # XEP-0045's affiliation "none": no row at all


@dataclass(frozen=True, slots=True)
class StoredRoom:
    jid: str  # room bare JID, normalised, e.g. "team@conference.localhost"
    config: dict[str, Any]  # JSON-serialisable room configuration (opaque to storage)
    subject: str | None
    subject_by: str | None  # nick (or JID) that set the subject
    created_at: datetime  # UTC, aware


@dataclass(frozen=True, slots=True)
class Affiliation:
    jid: str  # bare JID (user@domain) or a domain JID; normalised
    affiliation: str  # "owner" | "admin" | "member" | "outcast" ("none" only to remove one)
    nick: str | None = None  # reserved nick (XEP-0045 §7.10), optional
    reason: str | None = None


def room_domain(jid: str) -> str:
    """The MUC service of a room's bare JID; anything else is a caller's bug."""
    node, at, domain = jid.partition("@")
    if not at or not node or not domain or "/" in domain:
        raise ValueError(f"not a bare room JID: {jid!r}")
    return domain


def _check(item: Affiliation) -> None:
    if item.affiliation != NONE and item.affiliation not in AFFILIATIONS:
        raise ValueError(
            "room affiliation must be one of owner/admin/member/outcast/none,"
            f" not {item.affiliation!r}"
        )
    if not item.jid or "/" in item.jid:
        raise ValueError(f"affiliations are for bare or domain JIDs, not {item.jid!r}")


def _room(row: MucRoom) -> StoredRoom:
    return StoredRoom(
        jid=row.jid,
        config=dict(row.config),
        subject=row.subject,
        subject_by=row.subject_by,
        created_at=row.created_at,
    )


class Rooms(Store):
    async def get(self, jid: str) -> StoredRoom | None:
        async with self._sessions() as session:
            row = await session.scalar(select(MucRoom).where(MucRoom.jid == jid))
            return None if row is None else _room(row)

    async def list(self, domain: str | None = None) -> builtins.list[StoredRoom]:
        """Every stored room, or those of one MUC service (``domain``), sorted by JID."""
        stmt = select(MucRoom)
        if domain is not None:
            stmt = stmt.where(MucRoom.domain == domain)
        async with self._sessions() as session:
            rows = await session.scalars(stmt)
            # Sorted here, not by ORDER BY: database collations differ between backends.
            return sorted((_room(row) for row in rows), key=lambda room: room.jid)

    async def create(self, jid: str, config: dict[str, Any]) -> bool:
        """False, changing nothing, if the room exists: of two racing creators, one wins."""
        stmt = (
            self._conflict_insert(MucRoom)
            .values(jid=jid, domain=room_domain(jid), config=config)
            .on_conflict_do_nothing(index_elements=["jid"])
            .returning(MucRoom.jid)
        )
        async with self._sessions.begin() as session:
            created = (await session.execute(stmt)).scalar_one_or_none()
        return created is not None

    async def save_config(self, jid: str, config: dict[str, Any]) -> None:
        """Replace the configuration, creating the room if it is not stored yet (a temporary
        room made persistent); its subject and creation time stay."""
        stmt = self._conflict_insert(MucRoom).values(
            jid=jid, domain=room_domain(jid), config=config
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["jid"], set_={"config": stmt.excluded.config}
        )
        async with self._sessions.begin() as session:
            await session.execute(stmt)

    async def set_subject(self, jid: str, subject: str | None, by: str | None) -> None:
        """Store the subject (None clears it); raises RoomNotFound rather than lose it."""
        async with self._sessions.begin() as session:
            found = await session.scalar(
                update(MucRoom)
                .where(MucRoom.jid == jid)
                .values(subject=subject, subject_by=by)
                .returning(MucRoom.jid)
            )
            if found is None:
                raise RoomNotFound(jid)

    async def delete(self, jid: str) -> bool:
        """Delete the room and its affiliations; True if the room existed.

        Affiliations are deleted explicitly: ON DELETE CASCADE does nothing on a SQLite
        connection without ``PRAGMA foreign_keys=ON``, such as a shell's.
        """
        async with self._sessions.begin() as session:
            await session.execute(delete(MucAffiliation).where(MucAffiliation.room == jid))
            deleted = await session.scalar(
                delete(MucRoom).where(MucRoom.jid == jid).returning(MucRoom.jid)
            )
        return deleted is not None

    async def affiliations(self, jid: str) -> builtins.list[Affiliation]:
        """All of a room's affiliations, sorted by ``(affiliation, jid)``."""
        async with self._sessions() as session:
            rows = await session.scalars(select(MucAffiliation).where(MucAffiliation.room == jid))
            items = [Affiliation(row.jid, row.affiliation, row.nick, row.reason) for row in rows]
        return sorted(items, key=lambda item: (item.affiliation, item.jid))

    async def set_affiliation(self, room: str, item: Affiliation) -> None:
        """Insert or replace one affiliation; ``"none"`` removes it. Raises RoomNotFound."""
        await self.set_affiliations(room, [item])

    async def set_affiliations(self, room: str, items: Sequence[Affiliation]) -> None:
        """Apply several affiliation changes, as :meth:`set_affiliation` would one after the
        other, in one transaction: an owner's admin form is applied whole or not at all.

        Every item is checked before anything is written, so a bad one leaves the room as it
        was; for a JID given twice the last item wins, as in sequence.
        """
        for item in items:
            _check(item)
        if not items:
            return
        final = {item.jid: item for item in items}
        removed = [jid for jid, item in final.items() if item.affiliation == NONE]
        kept = [item for item in final.values() if item.affiliation != NONE]
        async with self._sessions.begin() as session:
            await self._lock_room(session, room)
            if removed:
                await session.execute(
                    delete(MucAffiliation).where(
                        MucAffiliation.room == room, MucAffiliation.jid.in_(removed)
                    )
                )
            if kept:
                stmt = self._conflict_insert(MucAffiliation).values(
                    [
                        {
                            "room": room,
                            "jid": item.jid,
                            "affiliation": item.affiliation,
                            "nick": item.nick,
                            "reason": item.reason,
                        }
                        for item in kept
                    ]
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=["room", "jid"],
                    set_={
                        "affiliation": stmt.excluded.affiliation,
                        "nick": stmt.excluded.nick,
                        "reason": stmt.excluded.reason,
                    },
                )
                await session.execute(stmt)

    async def rooms_of(self, jid: str) -> builtins.list[tuple[str, str]]:
        """``(room, affiliation)`` for every room where ``jid`` has one, sorted by room."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(MucAffiliation.room, MucAffiliation.affiliation).where(
                    MucAffiliation.jid == jid
                )
            )
            return sorted((room, affiliation) for room, affiliation in rows)

    async def _lock_room(self, session: AsyncSession, room: str) -> None:
        """Raise RoomNotFound unless the room exists, and keep it from being deleted until
        commit (PostgreSQL's FOR KEY SHARE; SQLite has a single writer anyway), so an
        affiliation cannot outlive its room or fail on the foreign key instead."""
        found = await session.scalar(
            select(MucRoom.jid)
            .where(MucRoom.jid == room)
            .with_for_update(read=True, key_share=True)
        )
        if found is None:
            raise RoomNotFound(room)
