"""HTTP File Upload (XEP-0363) slots and files: the metadata; the bytes live in a blob store.

An owner is a user's bare JID or the bare domain (files of server-wide sticker packs, stored
with an empty username). A pinned file is referenced by a published sticker pack (XEP-0449):
the expiry purge skips it, and it still counts against its owner's quota.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select, update

from .db import Store, split_user
from .tables import UploadedFile, utcnow


def split_owner(owner: str) -> tuple[str, str]:
    """``(domain, username)`` of a user's bare JID, ``(domain, "")`` of a bare domain."""
    if "@" not in owner and owner and "/" not in owner:
        return owner, ""
    return split_user(owner)


@dataclass(frozen=True)
class Upload:
    slot: str
    owner: str  # bare JID
    filename: str
    size: int
    content_type: str
    created_at: datetime
    completed_at: datetime | None
    path: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    thumbnail: str | None = None
    thumbnail_type: str | None = None
    thumbnail_width: int | None = None
    thumbnail_height: int | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Completion:
    """What is known of a file once its bytes arrived."""

    sha256: str
    width: int | None = None
    height: int | None = None
    thumbnail: str | None = None
    thumbnail_type: str | None = None
    thumbnail_width: int | None = None
    thumbnail_height: int | None = None


def _upload(row: UploadedFile) -> Upload:
    return Upload(
        slot=row.slot,
        owner=f"{row.username}@{row.domain}" if row.username else row.domain,
        filename=row.filename,
        size=row.size,
        content_type=row.content_type,
        created_at=row.created_at,
        completed_at=row.completed_at,
        path=row.path,
        sha256=row.sha256,
        width=row.width,
        height=row.height,
        thumbnail=row.thumbnail,
        thumbnail_type=row.thumbnail_type,
        thumbnail_width=row.thumbnail_width,
        thumbnail_height=row.thumbnail_height,
        pinned=row.pinned,
    )


class Uploads(Store):
    async def create(
        self,
        owner: str,
        slot: str,
        filename: str,
        size: int,
        content_type: str,
        path: str,
        *,
        completed: Completion | None = None,
    ) -> None:
        """A slot; with ``completed``, a file whose bytes are already in the blob store."""
        domain, username = split_owner(owner)
        row = UploadedFile(
            domain=domain,
            username=username,
            slot=slot,
            filename=filename,
            size=size,
            content_type=content_type,
            created_at=utcnow(),
            path=path,
        )
        if completed is not None:
            row.completed_at = row.created_at
            row.sha256 = completed.sha256
            row.width, row.height = completed.width, completed.height
        async with self._sessions.begin() as session:
            session.add(row)

    async def get(self, slot: str) -> Upload | None:
        async with self._sessions() as session:
            row = await session.get(UploadedFile, slot)
            return _upload(row) if row is not None else None

    async def usage(self, owner: str, pending_since: datetime) -> int:
        """Bytes of ``owner``'s files plus slots created since ``pending_since`` (still usable)."""
        domain, username = split_owner(owner)
        async with self._sessions() as session:
            total = await session.scalar(
                select(func.coalesce(func.sum(UploadedFile.size), 0)).where(
                    UploadedFile.domain == domain,
                    UploadedFile.username == username,
                    or_(
                        UploadedFile.completed_at.is_not(None),
                        UploadedFile.created_at >= pending_since,
                    ),
                )
            )
            return int(total or 0)

    async def complete(self, slot: str, done: Completion) -> bool:
        """Mark the slot's file as uploaded; False if it was already (or is gone)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(UploadedFile)
                .where(UploadedFile.slot == slot, UploadedFile.completed_at.is_(None))
                .values(
                    completed_at=utcnow(),
                    sha256=done.sha256,
                    width=done.width,
                    height=done.height,
                    thumbnail=done.thumbnail,
                    thumbnail_type=done.thumbnail_type,
                    thumbnail_width=done.thumbnail_width,
                    thumbnail_height=done.thumbnail_height,
                )
            )
            return bool(getattr(result, "rowcount", 0))

    async def expired(
        self, older_than: datetime | None, stale_before: datetime, limit: int = 1000
    ) -> builtins.list[Upload]:
        """Unpinned files created before ``older_than`` (None: none) and slots never used that
        were created before ``stale_before``, oldest first."""
        unused = and_(UploadedFile.completed_at.is_(None), UploadedFile.created_at < stale_before)
        condition = and_(
            UploadedFile.pinned.is_(False),
            unused if older_than is None else or_(unused, UploadedFile.created_at < older_than),
        )
        async with self._sessions() as session:
            rows = await session.scalars(
                select(UploadedFile).where(condition).order_by(UploadedFile.created_at).limit(limit)
            )
            return [_upload(row) for row in rows]

    async def delete(self, slots: Sequence[str]) -> int:
        if not slots:
            return 0
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(UploadedFile).where(UploadedFile.slot.in_(list(slots)))
            )
            return int(getattr(result, "rowcount", 0))

    async def set_pinned(self, owner: str, slots: Collection[str]) -> int:
        """Pin exactly ``slots`` among ``owner``'s files (others are unpinned); slots of other
        owners are left alone. Returns how many of ``owner``'s files are pinned now."""
        domain, username = split_owner(owner)
        wanted = builtins.list(set(slots))
        mine = (UploadedFile.domain == domain, UploadedFile.username == username)
        async with self._sessions.begin() as session:
            await session.execute(
                update(UploadedFile)
                .where(*mine, UploadedFile.pinned.is_(True), UploadedFile.slot.not_in(wanted))
                .values(pinned=False)
            )
            if not wanted:
                return 0
            result = await session.execute(
                update(UploadedFile).where(*mine, UploadedFile.slot.in_(wanted)).values(pinned=True)
            )
            return int(getattr(result, "rowcount", 0))

    async def list(self, owner: str) -> builtins.list[Upload]:
        domain, username = split_owner(owner)
        async with self._sessions() as session:
            rows = await session.scalars(
                select(UploadedFile)
                .where(UploadedFile.domain == domain, UploadedFile.username == username)
                .order_by(UploadedFile.created_at)
            )
            return [_upload(row) for row in rows]
