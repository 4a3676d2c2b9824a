"""The schema, defined once: Alembic migrates it and ``alembic check`` compares against it.

Per-user tables key rows by ``(domain, username)`` like ejabberd's ``(server_host, username)``,
without a foreign key to ``accounts``: stores work for any local user, and deleting an account
wipes every :class:`UserRow` table explicitly (see :func:`user_tables`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names must be stable and identical on every backend, or batch migrations on
# SQLite (which recreate tables) and `alembic check` cannot find them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGSERIAL on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """``timestamptz`` that also comes back aware from SQLite, which stores no offset."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage needs timezone-aware timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UserRow:
    """Mixin for data owned by one local user; deleting the account deletes these rows."""

    domain: Mapped[str] = mapped_column(Text, sort_order=-2)
    username: Mapped[str] = mapped_column(Text, sort_order=-1)


def user_tables() -> list[type[UserRow]]:
    """Every mapped per-user table, so a table added later is wiped with the account too."""
    return sorted(
        (m.class_ for m in Base.registry.mappers if issubclass(m.class_, UserRow)),
        key=lambda cls: cls.__name__,
    )


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (Index(None, "domain", "username", unique=True),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    domain: Mapped[str] = mapped_column(Text)
    username: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class AccountCredential(Base):
    """One row per SCRAM family; the password itself is never stored."""

    __tablename__ = "account_credentials"
    __table_args__ = (PrimaryKeyConstraint("account_id", "mechanism"),)

    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id", ondelete="CASCADE"))
    mechanism: Mapped[str] = mapped_column(Text)
    salt: Mapped[bytes] = mapped_column(LargeBinary)
    iterations: Mapped[int] = mapped_column(Integer)
    stored_key: Mapped[bytes] = mapped_column(LargeBinary)
    server_key: Mapped[bytes] = mapped_column(LargeBinary)


class RosterEntry(UserRow, Base):
    __tablename__ = "roster_items"
    __table_args__ = (
        Index(None, "domain", "username", "jid", unique=True),
        CheckConstraint("subscription IN ('none', 'to', 'from', 'both')", name="subscription"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    jid: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    subscription: Mapped[str] = mapped_column(Text)
    ask: Mapped[bool] = mapped_column(Boolean)
    approved: Mapped[bool] = mapped_column(Boolean)
    # Groups are only ever read and replaced with their item, so a JSON list beats a join.
    groups: Mapped[list[str]] = mapped_column(JSON)


class RosterVersion(UserRow, Base):
    """RFC 6121 §2.6 roster versioning: a counter bumped in the same transaction as the change."""

    __tablename__ = "roster_versions"
    __table_args__ = (PrimaryKeyConstraint("domain", "username"),)

    version: Mapped[int] = mapped_column(BigInteger)


class PendingSubscription(UserRow, Base):
    __tablename__ = "pending_subscriptions"
    # AUTOINCREMENT keeps SQLite from reusing the highest id after a delete: ids give arrival order.
    __table_args__ = (
        Index(None, "domain", "username", "contact", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    contact: Mapped[str] = mapped_column(Text)
    stanza: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class VCard(UserRow, Base):
    __tablename__ = "vcards"
    __table_args__ = (PrimaryKeyConstraint("domain", "username"),)

    xml: Mapped[str] = mapped_column(Text)


class LastSeen(UserRow, Base):
    """XEP-0012 Last Activity: when and with which status the user last went offline."""

    __tablename__ = "last_activity"
    __table_args__ = (PrimaryKeyConstraint("domain", "username"),)

    seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(Text)


class BlockedJid(UserRow, Base):
    """XEP-0191 Blocking Command list."""

    __tablename__ = "blocklist"
    __table_args__ = (PrimaryKeyConstraint("domain", "username", "jid"),)

    jid: Mapped[str] = mapped_column(Text)


class OfflineMessage(UserRow, Base):
    __tablename__ = "offline_messages"
    __table_args__ = (
        Index(None, "domain", "username", "id"),
        {"sqlite_autoincrement": True},  # ids must only grow, also after deletes
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    xml: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class QuarantinedRow(UserRow, Base):
    """A stored message that could not be read back (not well-formed, say), set aside so
    that one bad row never blocks the queue or archive page it was in. ``source`` names the
    table it came from (``offline_messages``, ``archive``); an operator can inspect it."""

    __tablename__ = "quarantine"
    __table_args__ = (Index(None, "domain", "username", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    source_id: Mapped[int] = mapped_column(BigInteger)
    xml: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


# Full-text search structures that only one backend has, so they are created by migration 0002
# outside these models; schema/env.py keeps `alembic check` from reporting them as drift.
ARCHIVE_FTS_TABLE = "archive_fts"  # SQLite FTS5 (and its shadow tables archive_fts_*)
ARCHIVE_FTS_INDEX = "ix_archive_body_fts"  # PostgreSQL GIN on to_tsvector('simple', body)


class ArchivedMessage(UserRow, Base):
    """XEP-0313 archive: one row per message per owner (an account, later a room's bare JID).

    Results are ordered by ``(timestamp, id)``, so the owner indexes end in ``id`` and serve
    every page as a range scan without a sort; the ``timestamp`` index is for retention.
    """

    __tablename__ = "archive"
    __table_args__ = (
        Index(None, "domain", "username", "stanza_id", unique=True),
        Index(None, "domain", "username", "timestamp", "id"),
        Index(None, "domain", "username", "with_jid", "timestamp", "id"),
        Index(None, "timestamp"),
        CheckConstraint("direction IN ('in', 'out')", name="direction"),
        {"sqlite_autoincrement": True},  # ids are never reused, also after a purge
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    stanza_id: Mapped[str] = mapped_column(Text)  # the archive id clients see (XEP-0359)
    with_jid: Mapped[str] = mapped_column(Text)  # the peer's bare JID
    with_resource: Mapped[str | None] = mapped_column(Text)  # for a 'with' full JID
    direction: Mapped[str] = mapped_column(Text)
    timestamp: Mapped[datetime] = mapped_column(UtcDateTime)
    xml: Mapped[str] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)  # what full-text search looks at


class ArchivePreference(UserRow, Base):
    """XEP-0441 archiving preferences; a user without a row gets the server's mode."""

    __tablename__ = "archive_prefs"
    __table_args__ = (
        PrimaryKeyConstraint("domain", "username"),
        CheckConstraint("default_mode IN ('always', 'never', 'roster')", name="default_mode"),
    )

    default_mode: Mapped[str] = mapped_column(Text)
    always: Mapped[list[str]] = mapped_column(JSON)
    never: Mapped[list[str]] = mapped_column(JSON)


class MucRoom(Base):
    """A persistent XEP-0045 room; ``domain`` (the MUC service) is a column so listing a
    service's rooms is an index scan.

    Rooms belong to a MUC service, not to a user: not a :class:`UserRow`, so deleting an
    account leaves the rooms it owned, and its affiliations in them, to the other owners.
    """

    __tablename__ = "muc_rooms"
    __table_args__ = (Index(None, "domain"),)

    jid: Mapped[str] = mapped_column(Text, primary_key=True)
    domain: Mapped[str] = mapped_column(Text)
    # Opaque to storage: the MUC module owns the configuration form and its defaults.
    config: Mapped[dict[str, object]] = mapped_column(JSON)
    subject: Mapped[str | None] = mapped_column(Text)
    subject_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class MucAffiliation(Base):
    """Who is owner/admin/member/outcast of a room; "none" is the absence of a row."""

    __tablename__ = "muc_affiliations"
    __table_args__ = (
        PrimaryKeyConstraint("room", "jid"),
        Index(None, "jid"),  # rooms_of(): every room a user is affiliated with
        CheckConstraint(
            "affiliation IN ('owner', 'admin', 'member', 'outcast')", name="affiliation"
        ),
    )

    room: Mapped[str] = mapped_column(Text, ForeignKey("muc_rooms.jid", ondelete="CASCADE"))
    jid: Mapped[str] = mapped_column(Text)
    affiliation: Mapped[str] = mapped_column(Text)
    nick: Mapped[str | None] = mapped_column(Text)  # reserved nick (XEP-0045 §7.10)
    reason: Mapped[str | None] = mapped_column(Text)


class PepNode(UserRow, Base):
    """A personal eventing (XEP-0163) node on a user's bare JID.

    ``config`` and ``affiliations`` are opaque JSON owned by the PEP module: the node
    configuration (access model, retention...) and the whitelist (bare JID → affiliation).
    """

    __tablename__ = "pep_nodes"
    __table_args__ = (PrimaryKeyConstraint("domain", "username", "node"),)

    node: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, object]] = mapped_column(JSON)
    affiliations: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class PepItem(UserRow, Base):
    """One published item of a PEP node; ordered by ``(published_at, id)``, oldest first.

    No foreign key to ``pep_nodes``: the store deletes a node's items in the same transaction
    as the node. The ``(node, published_at)`` index serves the purge of expiring items.
    """

    __tablename__ = "pep_items"
    __table_args__ = (
        Index(None, "domain", "username", "node", "item_id", unique=True),
        Index(None, "domain", "username", "node", "published_at", "id"),
        Index(None, "node", "published_at"),
        {"sqlite_autoincrement": True},  # ids only grow: they order items published together
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    node: Mapped[str] = mapped_column(Text)
    item_id: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    publisher: Mapped[str] = mapped_column(Text)
    published_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class UploadedFile(UserRow, Base):
    """An XEP-0363 upload slot and, once the PUT arrived, the file it holds.

    ``path`` and ``thumbnail`` are keys in the blob store (``xmpp_server/blobs.py``), not file
    system paths. ``completed_at`` stays NULL until the upload finished; a slot never used is
    purged once its PUT URL expired. Deleting the account deletes the rows; the blobs go with
    the next purge of orphans (``natterctl uploads purge``).
    """

    __tablename__ = "uploads"
    __table_args__ = (
        Index(None, "domain", "username"),
        Index(None, "created_at"),
    )

    slot: Mapped[str] = mapped_column(Text, primary_key=True)
    filename: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text)  # hex, computed while the PUT streamed in
    width: Mapped[int | None] = mapped_column(Integer)  # of an image or video
    height: Mapped[int | None] = mapped_column(Integer)
    thumbnail: Mapped[str | None] = mapped_column(Text)
    thumbnail_type: Mapped[str | None] = mapped_column(Text)
    thumbnail_width: Mapped[int | None] = mapped_column(Integer)
    thumbnail_height: Mapped[int | None] = mapped_column(Integer)
    # Referenced by a published sticker pack (XEP-0449): the expiry purge keeps it.
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class PushRegistration(UserRow, Base):
    """XEP-0357: an app server (``service``, e.g. push.example.org) to notify, under
    ``node``, when the account gets a message while its devices sleep. ``options`` holds
    the publish-options form fields the client gave (secret, device type...), sent along
    with every notification."""

    __tablename__ = "push_registrations"
    __table_args__ = (PrimaryKeyConstraint("domain", "username", "service", "node"),)

    service: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
