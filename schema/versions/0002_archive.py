"""Message archive (XEP-0313) with full-text search, and archiving preferences (XEP-0441).

Full-text search differs per backend and lives outside the models (``schema/env.py`` keeps
``alembic check`` from reporting it): PostgreSQL gets a GIN index on
``to_tsvector('simple', body)``; SQLite gets an FTS5 table over ``archive`` kept current by
triggers. A later batch migration of ``archive`` on SQLite recreates the table and drops those
triggers with it: it has to create them again (``sqlite_fts()``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# 'simple': lower-cased words, no stemming and no stop words, so any language is found as typed.
# The unicode61 tokenizer keeps diacritics to match PostgreSQL's 'simple' configuration.
POSTGRES_FTS = (
    "CREATE INDEX ix_archive_body_fts ON archive USING gin (to_tsvector('simple'::regconfig, body))"
)
SQLITE_FTS = (
    "CREATE VIRTUAL TABLE archive_fts USING fts5("
    "body, content='archive', content_rowid='id', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER archive_fts_insert AFTER INSERT ON archive WHEN new.body IS NOT NULL BEGIN"
    " INSERT INTO archive_fts(rowid, body) VALUES (new.id, new.body); END",
    "CREATE TRIGGER archive_fts_delete AFTER DELETE ON archive WHEN old.body IS NOT NULL BEGIN"
    " INSERT INTO archive_fts(archive_fts, rowid, body) VALUES ('delete', old.id, old.body);"
    " END",
    "CREATE TRIGGER archive_fts_update AFTER UPDATE OF body ON archive BEGIN"
    " INSERT INTO archive_fts(archive_fts, rowid, body)"
    " SELECT 'delete', old.id, old.body WHERE old.body IS NOT NULL;"
    " INSERT INTO archive_fts(rowid, body) SELECT new.id, new.body WHERE new.body IS NOT NULL;"
    " END",
)


def user_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
    ]


def sqlite_fts() -> None:
    for statement in SQLITE_FTS:
        op.execute(statement)


def upgrade() -> None:
    op.create_table(
        "archive",
        *user_columns(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("stanza_id", sa.Text(), nullable=False),
        sa.Column("with_jid", sa.Text(), nullable=False),
        sa.Column("with_resource", sa.Text(), nullable=True),
        sa.Column("direction", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("xml", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.CheckConstraint("direction IN ('in', 'out')", name=op.f("ck_archive_direction")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archive")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_archive_domain_username_stanza_id"),
        "archive",
        ["domain", "username", "stanza_id"],
        unique=True,
    )
    op.create_index(
        op.f("ix_archive_domain_username_timestamp_id"),
        "archive",
        ["domain", "username", "timestamp", "id"],
    )
    op.create_index(
        op.f("ix_archive_domain_username_with_jid_timestamp_id"),
        "archive",
        ["domain", "username", "with_jid", "timestamp", "id"],
    )
    op.create_index(op.f("ix_archive_timestamp"), "archive", ["timestamp"])

    op.create_table(
        "archive_prefs",
        *user_columns(),
        sa.Column("default_mode", sa.Text(), nullable=False),
        sa.Column("always", sa.JSON(), nullable=False),
        sa.Column("never", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "default_mode IN ('always', 'never', 'roster')",
            name=op.f("ck_archive_prefs_default_mode"),
        ),
        sa.PrimaryKeyConstraint("domain", "username", name=op.f("pk_archive_prefs")),
    )

    dialect = op.get_context().dialect.name
    if dialect == "postgresql":
        op.execute(POSTGRES_FTS)
    elif dialect == "sqlite":
        sqlite_fts()


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        # Triggers go with their table; the FTS table and its shadow tables do not.
        op.execute("DROP TABLE IF EXISTS archive_fts")
    op.drop_table("archive_prefs")
    op.drop_table("archive")  # indexes, the GIN one included, go with it
