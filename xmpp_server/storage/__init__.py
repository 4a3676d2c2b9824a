"""Persistent data: one :class:`Storage` per server, one small store per aggregate.

The same code runs on PostgreSQL (``postgresql+asyncpg://…``) and SQLite
(``sqlite+aiosqlite:///path``); the schema is owned by Alembic (``schema/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from .accounts import AccountInfo, Accounts
from .archive import (
    Archive,
    ArchiveEntry,
    ArchiveItem,
    ArchivePage,
    ArchivePrefs,
    UnknownArchiveId,
)
from .blocklist import Blocklists
from .db import hide_password, is_memory_sqlite, make_engine, reading, split_user, sqlite_file
from .errors import AccountExists, AccountNotFound, NotMigrated, RoomNotFound
from .last_activity import LastActivity
from .migrations import head_revision, is_known_revision, revision_of, upgrade_engine
from .offline import OfflineMessages, read_queue
from .pep import PepNodes, StoredPepItem, StoredPepNode
from .push import PushRegistrations, StoredPushRegistration
from .quarantine import Quarantine, Quarantined
from .rooms import Affiliation, Rooms, StoredRoom
from .rosters import RosterItem, Rosters, read_items
from .subscriptions import PendingSubscriptions, read_pending
from .uploads import Uploads
from .vcards import VCards

__all__ = [
    "AccountExists",
    "AccountInfo",
    "AccountNotFound",
    "Accounts",
    "Affiliation",
    "Archive",
    "ArchiveEntry",
    "ArchiveItem",
    "ArchivePage",
    "ArchivePrefs",
    "Blocklists",
    "InitialPresence",
    "LastActivity",
    "NotMigrated",
    "OfflineMessages",
    "PendingSubscriptions",
    "PepNodes",
    "PushRegistrations",
    "Quarantine",
    "Quarantined",
    "RoomNotFound",
    "Rooms",
    "RosterItem",
    "Rosters",
    "Storage",
    "StoredPepItem",
    "StoredPepNode",
    "StoredPushRegistration",
    "StoredRoom",
    "UnknownArchiveId",
    "VCards",
]


@dataclass(frozen=True, slots=True)
class InitialPresence:
    """What a session's initial presence reads (RFC 6121 §4.2-4.3, XEP-0160)."""

    roster: list[RosterItem]
    pending: list[tuple[str, str]]  # inbound subscription requests: (contact, stanza xml)
    offline: list[tuple[int, str]]  # (id, xml), oldest first; empty unless asked for


class Storage:
    """An engine, its session factory and the stores that use them."""

    def __init__(self, url: str, engine: AsyncEngine) -> None:
        self.url = url
        self.engine = engine
        # Loaded rows are plain values after commit; nothing lazy-loads behind a store's back.
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        dialect = engine.dialect.name
        self.accounts = Accounts(self.sessions, dialect)
        self.rosters = Rosters(self.sessions, dialect)
        self.subscriptions = PendingSubscriptions(self.sessions, dialect)
        self.vcards = VCards(self.sessions, dialect)
        self.last_activity = LastActivity(self.sessions, dialect)
        self.blocklist = Blocklists(self.sessions, dialect)
        self.offline = OfflineMessages(self.sessions, dialect)
        self.archive = Archive(self.sessions, dialect)
        self.rooms = Rooms(self.sessions, dialect)
        self.pep = PepNodes(self.sessions, dialect)
        self.uploads = Uploads(self.sessions, dialect)
        self.push = PushRegistrations(self.sessions, dialect)
        self.quarantine = Quarantine(self.sessions, dialect)

    async def initial_presence(self, user: str, *, offline: bool) -> InitialPresence:
        """Roster, pending subscription requests and (with ``offline``) the offline queue,
        on one connection checkout: this runs at every login, and each checkout and release
        costs more event-loop time than these small queries."""
        domain, username = split_user(user)
        async with reading(self.engine) as conn:
            roster = await read_items(conn, domain, username)
            pending = await read_pending(conn, domain, username)
            queue = await read_queue(conn, domain, username) if offline else []
        return InitialPresence(roster, pending, queue)

    @classmethod
    async def open(cls, url: str, *, require_migrated: bool = True) -> Storage:
        """Connect; raises NotMigrated unless the schema is at the head revision.

        An in-memory SQLite database (``sqlite+aiosqlite://``) starts empty every time, so it
        is migrated here instead.
        """
        parsed = make_url(url)
        path = sqlite_file(parsed)
        if require_migrated and path is not None and not Path(path).exists():
            raise NotMigrated(hide_password(url), None, head_revision())
        engine = make_engine(url)
        try:
            if is_memory_sqlite(parsed):
                await upgrade_engine(engine)
            elif require_migrated:
                current, head = await revision_of(engine), head_revision()
                if current != head:
                    known = current is None or is_known_revision(current)
                    raise NotMigrated(hide_password(url), current, head, known=known)
        except BaseException:
            await engine.dispose()
            raise
        return cls(url, engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Storage({hide_password(self.url)!r})"
