"""Engine set-up and the few places where PostgreSQL and SQLite differ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import URL, Table, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
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


def table_of(model: type[Base]) -> Table:
    """The Core table of a mapped class, for statements that skip the ORM's per-query cost."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


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


_read_turns: WeakKeyDictionary[AsyncEngine, asyncio.Lock] = WeakKeyDictionary()


@asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A Core connection for hot reads: rows as tuples, no Session, identity map or ORM
    compile step (about a tenth of a login's CPU went there).

    On SQLite the readers first queue on a lock: the pool's own wait for its one connection
    arms a SQLITE_POOL_TIMEOUT timer per waiter, which in a login storm cost more event-loop
    time than the queries. The lock holder's checkout still has that timeout."""
    if engine.dialect.name != "sqlite":
        async with engine.connect() as conn:
            yield conn
        return
    turn = _read_turns.get(engine)
    if turn is None:
        turn = _read_turns[engine] = asyncio.Lock()
    async with turn, engine.connect() as conn:
        yield conn


class Store:
    """Base of the stores: every public method is one short transaction of its own."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], dialect: str) -> None:
        self._sessions = sessions
        self._dialect = dialect
        engine = sessions.kw.get("bind")
        assert isinstance(engine, AsyncEngine)
        self._engine = engine

    def _connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return reading(self._engine)

    def _conflict_insert(self, model: type[Base] | Table) -> ConflictInsert:
        """An INSERT that can take ON CONFLICT, which both backends spell the same way."""
        if self._dialect == "postgresql":
            return postgresql.insert(model)
        if self._dialect == "sqlite":
            return sqlite.insert(model)
        raise NotImplementedError(f"unsupported database dialect {self._dialect!r}")
