"""Personal eventing (XEP-0163): PEP nodes and their items.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-16
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGSERIAL on PostgreSQL, a rowid alias on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def user_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "pep_nodes",
        *user_columns(),
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("affiliations", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("domain", "username", "node", name=op.f("pk_pep_nodes")),
    )
    op.create_table(
        "pep_items",
        *user_columns(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("item_id", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("publisher", sa.Text(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pep_items")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_pep_items_domain_username_node_item_id"),
        "pep_items",
        ["domain", "username", "node", "item_id"],
        unique=True,
    )
    op.create_index(
        op.f("ix_pep_items_domain_username_node_published_at_id"),
        "pep_items",
        ["domain", "username", "node", "published_at", "id"],
    )
    op.create_index(op.f("ix_pep_items_node_published_at"), "pep_items", ["node", "published_at"])


def downgrade() -> None:
    # Indexes go with their tables on both backends.
    op.drop_table("pep_items")
    op.drop_table("pep_nodes")
