"""Initial schema: accounts, rosters, subscriptions, vCards, last activity, blocklist, offline.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
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
        "accounts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    op.create_index(
        op.f("ix_accounts_domain_username"), "accounts", ["domain", "username"], unique=True
    )
    op.create_table(
        "account_credentials",
        sa.Column("account_id", BIG_ID, nullable=False),
        sa.Column("mechanism", sa.Text(), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.Column("iterations", sa.Integer(), nullable=False),
        sa.Column("stored_key", sa.LargeBinary(), nullable=False),
        sa.Column("server_key", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_account_credentials_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "mechanism", name=op.f("pk_account_credentials")),
    )

    op.create_table(
        "roster_items",
        *user_columns(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("jid", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("subscription", sa.Text(), nullable=False),
        sa.Column("ask", sa.Boolean(), nullable=False),
        sa.Column("approved", sa.Boolean(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "subscription IN ('none', 'to', 'from', 'both')",
            name=op.f("ck_roster_items_subscription"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_roster_items")),
    )
    op.create_index(
        op.f("ix_roster_items_domain_username_jid"),
        "roster_items",
        ["domain", "username", "jid"],
        unique=True,
    )
    op.create_table(
        "roster_versions",
        *user_columns(),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("domain", "username", name=op.f("pk_roster_versions")),
    )

    op.create_table(
        "pending_subscriptions",
        *user_columns(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("contact", sa.Text(), nullable=False),
        sa.Column("stanza", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_subscriptions")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_pending_subscriptions_domain_username_contact"),
        "pending_subscriptions",
        ["domain", "username", "contact"],
        unique=True,
    )

    op.create_table(
        "vcards",
        *user_columns(),
        sa.Column("xml", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("domain", "username", name=op.f("pk_vcards")),
    )
    op.create_table(
        "last_activity",
        *user_columns(),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("domain", "username", name=op.f("pk_last_activity")),
    )
    op.create_table(
        "blocklist",
        *user_columns(),
        sa.Column("jid", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("domain", "username", "jid", name=op.f("pk_blocklist")),
    )

    op.create_table(
        "offline_messages",
        *user_columns(),
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("xml", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offline_messages")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_offline_messages_domain_username_id"),
        "offline_messages",
        ["domain", "username", "id"],
    )


def downgrade() -> None:
    # Indexes go with their tables on both backends.
    op.drop_table("offline_messages")
    op.drop_table("blocklist")
    op.drop_table("last_activity")
    op.drop_table("vcards")
    op.drop_table("pending_subscriptions")
    op.drop_table("roster_versions")
    op.drop_table("roster_items")
    op.drop_table("account_credentials")
    op.drop_table("accounts")
