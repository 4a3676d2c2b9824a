"""Fixtures for every test directory: a database on each backend, and a migrated Storage.

PostgreSQL comes from ``NATTER_TEST_POSTGRES_URL`` (an admin URL; ``make test`` starts a server).
``NATTER_TEST_SKIP_POSTGRES=1`` skips the PostgreSQL half instead of failing it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from alembic import command
from sqlalchemy import URL, make_url

from tests.ports import TAKE_DEMO_PORTS_ENV, holding_demo_ports
from xmpp_server.storage import Storage
from xmpp_server.storage.migrations import alembic_config
from xmpp_server.storage.tables import Base

# Hypothesis test cases per test, for the `make fuzz` report (--fuzz-report).
pytest_plugins = ["tests.fuzz.stats"]

POSTGRES_URL_ENV = "NATTER_TEST_POSTGRES_URL"
SKIP_POSTGRES_ENV = "NATTER_TEST_SKIP_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run set-up that calls asyncio.run() (Alembic's env.py does) away from the test's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def _migrate(url: str) -> None:
    _in_thread(lambda: command.upgrade(alembic_config(url), "head"))


@dataclass(frozen=True)
class PostgresServer:
    url: URL  # SQLAlchemy URL of the admin database

    def database_url(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    async def execute(self, sql: str, database: str | None = None) -> None:
        url = self.url.set(drivername="postgresql")
        if database is not None:
            url = url.set(database=database)
        connection = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    def execute_blocking(self, sql: str) -> None:
        _in_thread(lambda: asyncio.run(self.execute(sql)))


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    if os.environ.get(SKIP_POSTGRES_ENV) == "1":
        pytest.skip(f"PostgreSQL tests skipped ({SKIP_POSTGRES_ENV}=1)")
    server = PostgresServer(make_url(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)))
    try:
        server.execute_blocking("SELECT 1")
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL at {server.url.render_as_string(hide_password=True)} is not reachable "
            f"({exc!r}). Run the tests with `make test`, which starts it, or point "
            f"{POSTGRES_URL_ENV} at a server (or set {SKIP_POSTGRES_ENV}=1 to skip them).",
            pytrace=False,
        )
    return server


@pytest.fixture(scope="session")
def postgres_migrated(postgres_server: PostgresServer) -> Iterator[str]:
    """One database at head for the session, emptied after each test that used it.

    CREATE DATABASE costs a third of a second or more per test; deleting a few rows costs
    milliseconds, which matters once every module's tests run on PostgreSQL too.
    """
    name = f"natter_test_{uuid.uuid4().hex}"
    postgres_server.execute_blocking(f'CREATE DATABASE "{name}"')
    try:
        _migrate(postgres_server.database_url(name))
        yield name
    finally:
        postgres_server.execute_blocking(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file at head, migrated once and copied for each test."""
    path = tmp_path_factory.mktemp("natter-template") / "natter.db"
    _migrate(f"sqlite+aiosqlite:///{path}")
    return path


async def _empty_postgres_database(server: PostgresServer, name: str) -> None:
    # Connections a test leaked could hold locks that would make the deletes wait forever.
    await server.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    deletes = "".join(
        f'DELETE FROM "{table.name}";' for table in reversed(Base.metadata.sorted_tables)
    )
    await server.execute(f"BEGIN;{deletes}COMMIT;", database=name)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database on each backend, with no rows in it.

    Without tables too, unless the test also uses ``migrated_db_url`` (or ``storage``, which
    uses it): then it is at the head revision, and the test must not migrate or drop it.
    """
    migrated = "migrated_db_url" in request.fixturenames
    if request.param == "sqlite":
        path = tmp_path / "natter.db"
        if migrated:
            shutil.copyfile(request.getfixturevalue("sqlite_migrated"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return

    server: PostgresServer = request.getfixturevalue("postgres_server")
    if migrated:
        name = request.getfixturevalue("postgres_migrated")
        try:
            yield server.database_url(name)
        finally:
            await _empty_postgres_database(server, name)
        return

    name = f"natter_test_{uuid.uuid4().hex}"
    await server.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.database_url(name)
    finally:
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """``db_url`` at the head revision: a copy of a database migrated once per session on
    SQLite, on PostgreSQL one database shared by the session and emptied after each test."""
    return db_url


@pytest.fixture
async def storage(migrated_db_url: str) -> AsyncIterator[Storage]:
    """An open Storage on ``migrated_db_url`` (the same database as ``db_url``), per backend."""
    opened = await Storage.open(migrated_db_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session", autouse=True)
def hold_demo_ports() -> Iterator[list[tuple[str, socket.SocketKind, int]]]:
    """With ``NATTER_TEST_TAKE_DEMO_PORTS=1`` (``make test`` sets it) the whole session runs
    with the ports of ``make run`` taken, so a test that needs one of them fails every time,
    not only on the machine of someone running the demo."""
    if os.environ.get(TAKE_DEMO_PORTS_ENV) != "1":
        yield []
        return
    with holding_demo_ports() as taken:
        yield taken


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the logging configuration back after each test: ``configure_logging`` (natterd's
    and natterctl's ``main``) replaces the root handlers and sets levels, and under pytest -n
    the next test on that worker is a different one each run."""
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not _pytest_handler(h)]
    level, disabled = root.level, logging.root.manager.disable
    levels = {
        name: (logger.level, logger.disabled)
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    for handler in root.handlers:
        if handler not in handlers and not _pytest_handler(handler):
            handler.close()
    # pytest's capture handlers come and go with each phase: leave those of this one.
    root.handlers[:] = handlers + [h for h in root.handlers if _pytest_handler(h)]
    root.setLevel(level)
    logging.disable(disabled)
    for name, (logger_level, logger_disabled) in levels.items():
        logger = logging.getLogger(name)
        logger.setLevel(logger_level)
        logger.disabled = logger_disabled


def _pytest_handler(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")
