"""Engine set-up and the few places where PostgreSQL and SQLite differ."""

from __future__ import annotations

from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool

from .tables import Base

SQLITE_BUSY_TIMEOUT_MS = 5000

ConflictInsert = postgresql.Insert | sqlite.Insert


def split_user(user: str) -> tuple[str, str]:
    """``(domain, username)`` of a normalised bare JID; anything else is a caller's bug."""
    username, at, domain = user.partition("@")
    if not at or not username or not domain or "/" in domain:
        raise ValueError(f"not a bare user JID: {user!r}")
    return domain, username


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_file(url: URL) -> str | None:
    """Path of an on-disk SQLite database, None for PostgreSQL or memory."""
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return None
    return url.database


def hide_password(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; foreign keys are off unless asked for;
    # busy_timeout makes a second writer wait instead of failing at once with "database is locked".
    # synchronous=NORMAL in WAL mode: a commit survives the process dying (kill -9), and only
    # an OS crash or power cut can lose the last commits; it saves an fsync per commit.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


SQLITE_POOL_TIMEOUT = 300.0  # seconds a transaction may wait for the one connection


def make_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # No pre-ping: it costs a round trip per transaction; a connection broken by a database
        # restart fails once, invalidates the pool, and the next transaction reconnects.
        return create_async_engine(parsed, pool_size=10, max_overflow=10)
    # One connection, handed out in turn: an in-memory database exists only on its connection,
    # and for a file SQLite allows one writer anyway. Several connections would contend for the
    # write lock and sleep in SQLite's busy handler (measured: a third fewer offline stores/s).
    # Waiting for it is the queue: in a storm of 10,000 logins a transaction waited over
    # SQLAlchemy's default 30 s and the login failed with internal-server-error; a client
    # gives up long before SQLITE_POOL_TIMEOUT, so nothing valid is refused for waiting.
    engine = create_async_engine(
        parsed,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=SQLITE_POOL_TIMEOUT,
    )
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


class Store:
    """Base of the stores: every public method is one short transaction of its own."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], dialect: str) -> None:
        self._sessions = sessions
        self._dialect = dialect

    def _conflict_insert(self, model: type[Base]) -> ConflictInsert:
        """An INSERT that can take ON CONFLICT, which both backends spell the same way."""
        if self._dialect == "postgresql":
            return postgresql.insert(model)
        if self._dialect == "sqlite":
            return sqlite.insert(model)
        raise NotImplementedError(f"unsupported database dialect {self._dialect!r}")
