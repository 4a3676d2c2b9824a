"""Rosters (RFC 6121 §2) with a version that changes in the same transaction as the items."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from .db import Store, split_user
from .tables import RosterEntry, RosterVersion

SUBSCRIPTIONS = frozenset({"none", "to", "from", "both"})


@dataclass(frozen=True, slots=True)
class RosterItem:
    jid: str
    name: str | None = None
    subscription: str = "none"  # "none" | "to" | "from" | "both"
    ask: bool = False  # an outbound subscription request is pending
    approved: bool = False  # pre-approved inbound subscription (RFC 6121 §3.4)
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.subscription not in SUBSCRIPTIONS:
            raise ValueError(
                f"roster subscription must be one of none/to/from/both, not {self.subscription!r}"
            )


def _item(row: RosterEntry) -> RosterItem:
    return RosterItem(
        jid=row.jid,
        name=row.name,
        subscription=row.subscription,
        ask=row.ask,
        approved=row.approved,
        groups=tuple(row.groups),
    )


class Rosters(Store):
    async def items(self, user: str) -> list[RosterItem]:
        domain, username = split_user(user)
        async with self._sessions() as session:
            rows = await session.scalars(
                select(RosterEntry).where(
                    RosterEntry.domain == domain, RosterEntry.username == username
                )
            )
            # Sorted here, not by ORDER BY: database collations differ between backends.
            return sorted((_item(row) for row in rows), key=lambda item: item.jid)

    async def get(self, user: str, jid: str) -> RosterItem | None:
        domain, username = split_user(user)
        async with self._sessions() as session:
            row = await session.scalar(
                select(RosterEntry).where(
                    RosterEntry.domain == domain,
                    RosterEntry.username == username,
                    RosterEntry.jid == jid,
                )
            )
            return None if row is None else _item(row)

    async def put(self, user: str, item: RosterItem) -> int:
        """Insert or replace the item; returns the new roster version."""
        domain, username = split_user(user)
        values = {
            "name": item.name,
            "subscription": item.subscription,
            "ask": item.ask,
            "approved": item.approved,
            "groups": list(item.groups),
        }
        stmt = (
            self._conflict_insert(RosterEntry)
            .values(domain=domain, username=username, jid=item.jid, **values)
            .on_conflict_do_update(index_elements=["domain", "username", "jid"], set_=values)
        )
        async with self._sessions.begin() as session:
            await session.execute(stmt)
            return await self._bump(session, domain, username)

    async def remove(self, user: str, jid: str) -> int | None:
        """Returns the new roster version, or None (and no new version) if there was no item."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            removed = await session.scalar(
                delete(RosterEntry)
                .where(
                    RosterEntry.domain == domain,
                    RosterEntry.username == username,
                    RosterEntry.jid == jid,
                )
                .returning(RosterEntry.id)
            )
            if removed is None:
                return None
            return await self._bump(session, domain, username)

    async def version(self, user: str) -> int:
        domain, username = split_user(user)
        async with self._sessions() as session:
            version = await session.scalar(
                select(RosterVersion.version).where(
                    RosterVersion.domain == domain, RosterVersion.username == username
                )
            )
            return version or 0

    async def _bump(self, session: AsyncSession, domain: str, username: str) -> int:
        # The upsert locks the user's version row, so concurrent changes get distinct versions.
        stmt = (
            self._conflict_insert(RosterVersion)
            .values(domain=domain, username=username, version=1)
            .on_conflict_do_update(
                index_elements=["domain", "username"],
                set_={"version": RosterVersion.version + 1},
            )
            .returning(RosterVersion.version)
        )
        version: int = (await session.execute(stmt)).scalar_one()
        return version
