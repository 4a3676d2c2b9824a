"""Multi-User Chat rooms (XEP-0045): persistent rooms and their affiliations.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "muc_rooms",
        sa.Column("jid", sa.Text(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("subject_by", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jid", name=op.f("pk_muc_rooms")),
    )
    op.create_index(op.f("ix_muc_rooms_domain"), "muc_rooms", ["domain"])

    op.create_table(
        "muc_affiliations",
        sa.Column("room", sa.Text(), nullable=False),
        sa.Column("jid", sa.Text(), nullable=False),
        sa.Column("affiliation", sa.Text(), nullable=False),
        sa.Column("nick", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "affiliation IN ('owner', 'admin', 'member', 'outcast')",
            name=op.f("ck_muc_affiliations_affiliation"),
        ),
        sa.ForeignKeyConstraint(
            ["room"],
            ["muc_rooms.jid"],
            name=op.f("fk_muc_affiliations_room_muc_rooms"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("room", "jid", name=op.f("pk_muc_affiliations")),
    )
    op.create_index(op.f("ix_muc_affiliations_jid"), "muc_affiliations", ["jid"])


def downgrade() -> None:
    # Indexes go with their tables on both backends; affiliations first, for the foreign key.
    op.drop_table("muc_affiliations")
    op.drop_table("muc_rooms")
