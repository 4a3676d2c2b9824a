"""vcard-temp (XEP-0054) documents, stored as the XML the user published."""

from __future__ import annotations

from sqlalchemy import delete, select

from .db import Store, split_user
from .tables import VCard


class VCards(Store):
    async def get(self, user: str) -> str | None:
        domain, username = split_user(user)
        async with self._sessions() as session:
            return await session.scalar(
                select(VCard.xml).where(VCard.domain == domain, VCard.username == username)
            )

    async def set(self, user: str, xml: str | None) -> None:
        """Replace the vCard; None deletes it."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            if xml is None:
                await session.execute(
                    delete(VCard).where(VCard.domain == domain, VCard.username == username)
                )
                return
            stmt = (
                self._conflict_insert(VCard)
                .values(domain=domain, username=username, xml=xml)
                .on_conflict_do_update(index_elements=["domain", "username"], set_={"xml": xml})
            )
            await session.execute(stmt)
