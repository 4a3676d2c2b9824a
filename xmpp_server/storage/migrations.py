"""Alembic, driven from code: the schema/ directory of the repository, the URL given here.

Migrations run only on request (``natterctl db upgrade``), never as a side effect of starting
the server: an upgrade of a shared PostgreSQL database is an operator's decision.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import is_memory_sqlite, make_engine, sqlite_file

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"


def alembic_config(url: str) -> Config:
    cfg = Config()
    # Options go through ConfigParser interpolation, where "%" starts a reference.
    cfg.set_main_option("script_location", str(SCHEMA_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(""))


def head_revision() -> str:
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {SCHEMA_DIR}")
    return head


def is_known_revision(revision: str) -> bool:
    """False for a revision written by a newer natterd than this one."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


async def upgrade(url: str) -> None:
    path = sqlite_file(make_url(url))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # env.py calls asyncio.run() itself, which needs a thread without a running loop.
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")


def _revision_on(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def revision_of(engine: AsyncEngine) -> str | None:
    """Current revision through an existing engine; None for an empty database."""
    async with engine.connect() as connection:
        return await connection.run_sync(_revision_on)


async def current_revision(url: str) -> str | None:
    parsed = make_url(url)
    path = sqlite_file(parsed)
    if is_memory_sqlite(parsed) or (path is not None and not Path(path).exists()):
        return None  # don't create an empty file just to look into it
    engine = make_engine(url)
    try:
        return await revision_of(engine)
    finally:
        await engine.dispose()


def _upgrade_on(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection  # env.py runs on it instead of its own engine
    command.upgrade(cfg, "head")


async def upgrade_engine(engine: AsyncEngine) -> None:
    """Migrate through an existing engine: the only way to reach an in-memory database."""
    url = engine.url.render_as_string(hide_password=False)
    async with engine.connect() as connection:
        await connection.run_sync(_upgrade_on, url)
        await connection.commit()
