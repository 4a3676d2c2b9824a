"""Blocked JIDs (XEP-0191 Blocking Command)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select

from .db import Store, split_user
from .tables import BlockedJid


class Blocklists(Store):
    async def get(self, user: str) -> list[str]:
        domain, username = split_user(user)
        async with self._sessions() as session:
            jids = await session.scalars(
                select(BlockedJid.jid).where(
                    BlockedJid.domain == domain, BlockedJid.username == username
                )
            )
            return sorted(jids)

    async def owners(self) -> set[str]:
        """Every user with at least one blocked JID (the others need no lookup)."""
        async with self._sessions() as session:
            rows = await session.execute(select(BlockedJid.username, BlockedJid.domain).distinct())
            return {f"{username}@{domain}" for username, domain in rows}

    async def add(self, user: str, jids: Sequence[str]) -> None:
        """Block the JIDs; blocking an already blocked JID is not an error."""
        domain, username = split_user(user)
        unique = list(dict.fromkeys(jids))
        if not unique:
            return
        stmt = (
            self._conflict_insert(BlockedJid)
            .values([{"domain": domain, "username": username, "jid": jid} for jid in unique])
            .on_conflict_do_nothing(index_elements=["domain", "username", "jid"])
        )
        async with self._sessions.begin() as session:
            await session.execute(stmt)

    async def remove(self, user: str, jids: Sequence[str]) -> None:
        domain, username = split_user(user)
        if not jids:
            return
        async with self._sessions.begin() as session:
            await session.execute(
                delete(BlockedJid).where(
                    BlockedJid.domain == domain,
                    BlockedJid.username == username,
                    BlockedJid.jid.in_(list(jids)),
                )
            )

    async def clear(self, user: str) -> None:
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            await session.execute(
                delete(BlockedJid).where(
                    BlockedJid.domain == domain, BlockedJid.username == username
                )
            )
