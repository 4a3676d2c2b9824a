"""Storage exceptions, importable without pulling in SQLAlchemy engines."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError


class NotMigrated(Exception):
    """The database schema is not the one this code was written for: refuse to touch it."""

    def __init__(self, url: str, current: str | None, head: str, *, known: bool = True) -> None:
        self.url = url  # password already hidden
        self.current = current
        self.head = head
        at = current if current is not None else "none (empty database)"
        if known:
            advice = "run: natterctl db upgrade"
        else:
            advice = "it was migrated by a newer natterd; run that version or restore a backup"
        super().__init__(
            f"database {url} is at schema revision {at}, the server needs {head}; {advice}"
        )


class AccountExists(Exception):
    pass


class AccountNotFound(Exception):
    pass


class RoomNotFound(LookupError):
    """A change to a MUC room that has no stored row (XEP-0045 item-not-found)."""

    def __init__(self, room: str) -> None:
        super().__init__(f"no room {room}")
        self.room = room


# What a store raises when the database cannot be reached or cannot write right now (server
# down, connection reset, a lock or a full disk): worth a "try again later", not a crash.
STORAGE_DOWN: tuple[type[Exception], ...] = (SQLAlchemyError, OSError)
