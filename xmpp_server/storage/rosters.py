"""Rosters (RFC 6121 §2) with a version that changes in the same transaction as the items."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from .db import Store, split_user, table_of
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


_roster = table_of(RosterEntry)
_versions = table_of(RosterVersion)

# Read at every initial presence: a constant Core statement compiles once and its rows are
# plain tuples, without the ORM's per-row entity work.
_ITEMS = select(
    _roster.c.jid,
    _roster.c.name,
    _roster.c.subscription,
    _roster.c.ask,
    _roster.c.approved,
    _roster.c.groups,
).where(_roster.c.domain == bindparam("domain"), _roster.c.username == bindparam("username"))
_ITEM = _ITEMS.where(_roster.c.jid == bindparam("jid"))
_COUNT = select(func.count()).where(
    _roster.c.domain == bindparam("domain"), _roster.c.username == bindparam("username")
)
_VERSION = select(_versions.c.version).where(
    _versions.c.domain == bindparam("domain"), _versions.c.username == bindparam("username")
)


def _items(rows: Iterable[Any]) -> list[RosterItem]:
    # Sorted here, not by ORDER BY: database collations differ between backends.
    return sorted(
        (
            RosterItem(jid, name, subscription, bool(ask), bool(approved), tuple(groups))
            for jid, name, subscription, ask, approved, groups in rows
        ),
        key=lambda item: item.jid,
    )


async def read_items(conn: AsyncConnection, domain: str, username: str) -> list[RosterItem]:
    """The roster on a connection the caller holds (see Storage.initial_presence)."""
    return _items(await conn.execute(_ITEMS, {"domain": domain, "username": username}))


class Rosters(Store):
    async def items(self, user: str) -> list[RosterItem]:
        domain, username = split_user(user)
        async with self._connect() as conn:
            return await read_items(conn, domain, username)

    async def get(self, user: str, jid: str) -> RosterItem | None:
        domain, username = split_user(user)
        async with self._connect() as conn:
            rows = await conn.execute(_ITEM, {"domain": domain, "username": username, "jid": jid})
            items = _items(rows)
        return items[0] if items else None

    async def count(self, user: str) -> int:
        """How many items the roster holds (the per-user cap)."""
        domain, username = split_user(user)
        async with self._connect() as conn:
            return int(await conn.scalar(_COUNT, {"domain": domain, "username": username}) or 0)

    async def snapshot(self, user: str, known: str | None) -> tuple[int, list[RosterItem] | None]:
        """The version and, unless it is ``known`` to the client already (RFC 6121 §2.6), the
        items: a login's roster get on one connection checkout."""
        domain, username = split_user(user)
        params = {"domain": domain, "username": username}
        async with self._connect() as conn:
            version = await conn.scalar(_VERSION, params) or 0
            if known == str(version):
                return version, None
            return version, _items(await conn.execute(_ITEMS, params))

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
        async with self._connect() as conn:
            version = await conn.scalar(_VERSION, {"domain": domain, "username": username})
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
