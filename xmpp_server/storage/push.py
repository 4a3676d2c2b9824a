"""Push registrations (XEP-0357): which app servers to notify for an account, under which
node, with which publish options."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select

from .db import Store, split_user
from .tables import PushRegistration, utcnow


@dataclass(frozen=True, slots=True)
class StoredPushRegistration:
    service: str  # the app server's JID
    node: str
    options: dict[str, str]  # publish-options fields (FORM_TYPE excluded)
    created_at: datetime


class PushRegistrations(Store):
    async def enable(self, user: str, service: str, node: str, options: dict[str, str]) -> None:
        """Add or replace the registration for ``(service, node)``."""
        domain, username = split_user(user)
        now = utcnow()
        stmt = (
            self._conflict_insert(PushRegistration)
            .values(
                domain=domain,
                username=username,
                service=service,
                node=node,
                options=options,
                created_at=now,
            )
            .on_conflict_do_update(
                index_elements=["domain", "username", "service", "node"],
                set_={"options": options, "created_at": now},
            )
        )
        async with self._sessions.begin() as session:
            await session.execute(stmt)

    async def disable(self, user: str, service: str, node: str | None = None) -> int:
        """Remove one node's registration, or (``node`` None) all with ``service``."""
        domain, username = split_user(user)
        stmt = delete(PushRegistration).where(
            PushRegistration.domain == domain,
            PushRegistration.username == username,
            PushRegistration.service == service,
        )
        if node is not None:
            stmt = stmt.where(PushRegistration.node == node)
        async with self._sessions.begin() as session:
            result = await session.execute(stmt)
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def list(self, user: str) -> builtins.list[StoredPushRegistration]:
        domain, username = split_user(user)
        async with self._sessions() as session:
            rows = await session.scalars(
                select(PushRegistration).where(
                    PushRegistration.domain == domain, PushRegistration.username == username
                )
            )
            found = [
                StoredPushRegistration(r.service, r.node, dict(r.options), r.created_at)
                for r in rows
            ]
        return sorted(found, key=lambda r: (r.service, r.node))
