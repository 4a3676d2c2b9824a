"""Alembic environment for natterd, after Alembic's async template.

natterd builds the Config in code (``xmpp_server.storage.migrations.alembic_config``), which sets
``sqlalchemy.url``. From a shell, pass the URL instead:
``alembic -x url=sqlite+aiosqlite:///data/natter.db upgrade head``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.util.exc import CommandError
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import async_engine_from_config

from xmpp_server.storage.tables import (
    ARCHIVE_FTS_INDEX,
    ARCHIVE_FTS_TABLE,
    Base,
    UtcDateTime,
)

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        try:
            url = config.get_main_option("sqlalchemy.url")
        except CommandError:  # the CLI with only pyproject.toml has no ini section to ask
            url = None
    if not url:
        raise CommandError("no database URL: set sqlalchemy.url or pass -x url=...")
    return url


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Write our column types as plain SQLAlchemy ones, so migrations never import the app."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Leave the per-backend full-text search structures of migration 0002 out of comparisons."""
    if type_ == "table":
        return not (name or "").startswith(ARCHIVE_FTS_TABLE)
    return not (type_ == "index" and name == ARCHIVE_FTS_INDEX)


def configure(**kwargs: Any) -> None:
    # Batch mode lets ALTERs work on SQLite (it recreates the table); PostgreSQL gets plain ALTERs.
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        render_item=render_item,
        include_name=include_name,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``) instead of running it."""
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    connectable = async_engine_from_config(
        {"sqlalchemy.url": database_url()}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    async with connectable.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await connectable.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed over by the caller, e.g. an in-memory SQLite database
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
