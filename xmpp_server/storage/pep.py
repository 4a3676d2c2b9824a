"""Personal eventing (XEP-0163) nodes and items on users' bare JIDs.

A node's configuration and whitelist are opaque JSON owned by the PEP module; items are the
payload XML as published (serialised standalone). Items are kept oldest first, ordered by
``(published_at, id)``; publishing an existing item id replaces it and makes it the newest.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .db import Store, split_user
from .tables import PepItem, PepNode, utcnow


@dataclass(frozen=True, slots=True)
class StoredPepNode:
    node: str
    config: dict[str, Any]  # JSON-serialisable node configuration (opaque to storage)
    affiliations: dict[str, str]  # bare JID → affiliation (opaque to storage)
    created_at: datetime  # UTC, aware


@dataclass(frozen=True, slots=True)
class StoredPepItem:
    item_id: str
    payload: str  # the item's payload XML
    publisher: str  # the JID that published it
    published_at: datetime  # UTC, aware


def _node(row: PepNode) -> StoredPepNode:
    return StoredPepNode(row.node, dict(row.config), dict(row.affiliations), row.created_at)


def _item(row: PepItem) -> StoredPepItem:
    return StoredPepItem(row.item_id, row.payload, row.publisher, row.published_at)


class PepNodes(Store):
    # -- nodes ------------------------------------------------------------------------

    async def get_node(self, user: str, node: str) -> StoredPepNode | None:
        domain, username = split_user(user)
        async with self._sessions() as session:
            row = await session.scalar(
                select(PepNode).where(
                    PepNode.domain == domain, PepNode.username == username, PepNode.node == node
                )
            )
            return None if row is None else _node(row)

    async def nodes(self, user: str) -> builtins.list[StoredPepNode]:
        """The user's nodes, sorted by name."""
        domain, username = split_user(user)
        async with self._sessions() as session:
            rows = await session.scalars(
                select(PepNode).where(PepNode.domain == domain, PepNode.username == username)
            )
            # Sorted here, not by ORDER BY: database collations differ between backends.
            return sorted((_node(row) for row in rows), key=lambda n: n.node)

    async def create_node(
        self,
        user: str,
        node: str,
        config: dict[str, Any],
        affiliations: dict[str, str] | None = None,
    ) -> bool:
        """False, changing nothing, if the node exists: of two racing creators, one wins."""
        domain, username = split_user(user)
        stmt = (
            self._conflict_insert(PepNode)
            .values(
                domain=domain,
                username=username,
                node=node,
                config=config,
                affiliations=affiliations or {},
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["domain", "username", "node"])
        )
        async with self._sessions.begin() as session:
            result = await session.execute(stmt)
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def configure(
        self, user: str, node: str, config: dict[str, Any], *, max_items: int | None = None
    ) -> bool:
        """Replace the configuration, then keep only the newest ``max_items`` items;
        False if there is no such node."""
        async with self._sessions.begin() as session:
            if not await self._update_node(session, user, node, config=config):
                return False
            if max_items is not None:
                await self._trim(session, user, node, max_items)
            return True

    async def set_affiliations(self, user: str, node: str, affiliations: dict[str, str]) -> bool:
        """Replace the node's affiliations; False if there is no such node."""
        async with self._sessions.begin() as session:
            return await self._update_node(session, user, node, affiliations=affiliations)

    async def _update_node(
        self, session: AsyncSession, user: str, node: str, **values: Any
    ) -> bool:
        domain, username = split_user(user)
        result = await session.execute(
            update(PepNode)
            .where(PepNode.domain == domain, PepNode.username == username, PepNode.node == node)
            .values(**values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def delete_node(self, user: str, node: str) -> bool:
        """Delete the node and its items; False if there was no such node."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            await session.execute(
                delete(PepItem).where(
                    PepItem.domain == domain, PepItem.username == username, PepItem.node == node
                )
            )
            result = await session.execute(
                delete(PepNode).where(
                    PepNode.domain == domain, PepNode.username == username, PepNode.node == node
                )
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- items ------------------------------------------------------------------------

    async def publish(
        self,
        user: str,
        node: str,
        item_id: str,
        payload: str,
        publisher: str,
        *,
        max_items: int | None = None,
        published_at: datetime | None = None,
    ) -> builtins.list[str]:
        """Store (or replace) an item as the node's newest, then keep only the newest
        ``max_items``; returns the ids of the items retention removed, oldest first."""
        domain, username = split_user(user)
        when = published_at or utcnow()
        async with self._sessions.begin() as session:
            # Delete and insert rather than update: a replaced item gets a new, higher id and
            # so is the newest even when two items share a timestamp.
            await session.execute(
                delete(PepItem).where(
                    PepItem.domain == domain,
                    PepItem.username == username,
                    PepItem.node == node,
                    PepItem.item_id == item_id,
                )
            )
            values = {
                "domain": domain,
                "username": username,
                "node": node,
                "item_id": item_id,
                "payload": payload,
                "publisher": publisher,
                "published_at": when,
            }
            # Of two racing publishers of one item id, the later commit wins.
            await session.execute(
                self._conflict_insert(PepItem)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=["domain", "username", "node", "item_id"],
                    set_={"payload": payload, "publisher": publisher, "published_at": when},
                )
            )
            if max_items is None:
                return []
            return await self._trim(session, user, node, max_items)

    async def _trim(
        self, session: AsyncSession, user: str, node: str, max_items: int
    ) -> builtins.list[str]:
        domain, username = split_user(user)
        stale = (
            await session.execute(
                select(PepItem.id, PepItem.item_id)
                .where(PepItem.domain == domain, PepItem.username == username, PepItem.node == node)
                .order_by(PepItem.published_at.desc(), PepItem.id.desc())
                .offset(max(0, max_items))
            )
        ).all()
        if not stale:
            return []
        await session.execute(delete(PepItem).where(PepItem.id.in_([row.id for row in stale])))
        return [row.item_id for row in reversed(stale)]

    async def items(
        self,
        user: str,
        node: str,
        *,
        max_items: int | None = None,
        item_ids: Collection[str] | None = None,
        published_after: datetime | None = None,
    ) -> builtins.list[StoredPepItem]:
        """Items oldest first: all, the newest ``max_items``, or those with the given ids;
        only those published after ``published_after`` if given (expiring nodes)."""
        domain, username = split_user(user)
        stmt = select(PepItem).where(
            PepItem.domain == domain, PepItem.username == username, PepItem.node == node
        )
        if item_ids is not None:
            stmt = stmt.where(PepItem.item_id.in_(list(item_ids)))
        if published_after is not None:
            stmt = stmt.where(PepItem.published_at > published_after)
        stmt = stmt.order_by(PepItem.published_at.desc(), PepItem.id.desc())
        if max_items is not None:
            stmt = stmt.limit(max(0, max_items))
        async with self._sessions() as session:
            rows = list(await session.scalars(stmt))
        return [_item(row) for row in reversed(rows)]

    async def count(self, user: str, node: str) -> int:
        domain, username = split_user(user)
        async with self._sessions() as session:
            found = await session.scalar(
                select(func.count())
                .select_from(PepItem)
                .where(PepItem.domain == domain, PepItem.username == username, PepItem.node == node)
            )
            return int(found or 0)

    async def retract(self, user: str, node: str, item_ids: Collection[str]) -> builtins.list[str]:
        """Delete items by id; returns the ids that existed (in the order asked)."""
        domain, username = split_user(user)
        wanted = list(dict.fromkeys(item_ids))
        where = (
            PepItem.domain == domain,
            PepItem.username == username,
            PepItem.node == node,
            PepItem.item_id.in_(wanted),
        )
        async with self._sessions.begin() as session:
            found = set(await session.scalars(select(PepItem.item_id).where(*where)))
            if found:
                await session.execute(delete(PepItem).where(*where))
        return [item_id for item_id in wanted if item_id in found]

    async def purge(self, user: str, node: str) -> int:
        """Delete every item of the node; returns how many there were."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(PepItem).where(
                    PepItem.domain == domain, PepItem.username == username, PepItem.node == node
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def expire(self, node: str, before: datetime) -> int:
        """Delete the items of every user's ``node`` published before ``before``."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(PepItem).where(PepItem.node == node, PepItem.published_at < before)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
