"""Inbound subscription requests awaiting the user's answer (RFC 6121 §3.1.3).

They are redelivered at every login until the user approves or denies them.
"""

from __future__ import annotations

import builtins

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from .db import Store, split_user, table_of
from .tables import PendingSubscription

_pending = table_of(PendingSubscription)

# Read at every initial presence: a constant statement compiles once.
_PENDING = (
    select(_pending.c.contact, _pending.c.stanza)
    .where(_pending.c.domain == bindparam("domain"), _pending.c.username == bindparam("username"))
    .order_by(_pending.c.id)
)


async def read_pending(conn: AsyncConnection, domain: str, username: str) -> list[tuple[str, str]]:
    """``(contact, stanza xml)`` in order of arrival, on a connection the caller holds."""
    rows = await conn.execute(_PENDING, {"domain": domain, "username": username})
    return [(contact, stanza) for contact, stanza in rows]


class PendingSubscriptions(Store):
    async def add(self, user: str, contact: str, stanza: str) -> None:
        """Store the request; a repeated one replaces the old and counts as the newest."""
        domain, username = split_user(user)
        try:
            async with self._sessions.begin() as session:
                await session.execute(
                    delete(PendingSubscription).where(
                        PendingSubscription.domain == domain,
                        PendingSubscription.username == username,
                        PendingSubscription.contact == contact,
                    )
                )
                await session.execute(
                    insert(PendingSubscription).values(
                        domain=domain, username=username, contact=contact, stanza=stanza
                    )
                )
        except IntegrityError:
            # A concurrent add for the same contact committed first; that request stands.
            return

    async def remove(self, user: str, contact: str) -> bool:
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            removed = await session.scalar(
                delete(PendingSubscription)
                .where(
                    PendingSubscription.domain == domain,
                    PendingSubscription.username == username,
                    PendingSubscription.contact == contact,
                )
                .returning(PendingSubscription.id)
            )
        return removed is not None

    async def list(self, user: str) -> builtins.list[tuple[str, str]]:
        """``(contact, stanza xml)`` in order of arrival."""
        domain, username = split_user(user)
        async with self._connect() as conn:
            return await read_pending(conn, domain, username)
