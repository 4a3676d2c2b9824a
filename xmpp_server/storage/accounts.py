"""Accounts and their SCRAM credentials."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, delete, insert, select

from ..credentials import ScramCredentials
from .db import Store, split_user, table_of
from .errors import AccountExists, AccountNotFound
from .tables import Account, AccountCredential, user_tables

_accounts = table_of(Account)
_credentials = table_of(AccountCredential)

# Built once: a constant statement's cache key is memoised, so every login reuses the
# compiled SQL without walking the statement again.
_CREDENTIALS = (
    select(
        _credentials.c.salt,
        _credentials.c.iterations,
        _credentials.c.stored_key,
        _credentials.c.server_key,
    )
    .select_from(_credentials.join(_accounts, _accounts.c.id == _credentials.c.account_id))
    .where(
        _accounts.c.domain == bindparam("domain"),
        _accounts.c.username == bindparam("username"),
        _credentials.c.mechanism == bindparam("mechanism"),
    )
)


@dataclass(frozen=True, slots=True)
class AccountInfo:
    user: str
    created_at: datetime  # UTC, aware
    mechanisms: tuple[str, ...]  # sorted


def _rows(account_id: int, credentials: Sequence[ScramCredentials]) -> list[dict[str, object]]:
    mechanisms = [c.mechanism for c in credentials]
    if len(set(mechanisms)) != len(mechanisms):
        raise ValueError(f"duplicate SCRAM mechanism in {mechanisms}")
    return [
        {
            "account_id": account_id,
            "mechanism": c.mechanism,
            "salt": c.salt,
            "iterations": c.iterations,
            "stored_key": c.stored_key,
            "server_key": c.server_key,
        }
        for c in credentials
    ]


class Accounts(Store):
    async def create(self, user: str, credentials: Sequence[ScramCredentials]) -> None:
        """Raises AccountExists; ON CONFLICT instead of catching IntegrityError keeps the
        transaction usable and does not confuse a duplicate account with any other violation."""
        domain, username = split_user(user)
        _rows(0, credentials)  # validate before writing anything
        async with self._sessions.begin() as session:
            stmt = (
                self._conflict_insert(Account)
                .values(domain=domain, username=username)
                .on_conflict_do_nothing(index_elements=["domain", "username"])
                .returning(Account.id)
            )
            account_id = (await session.execute(stmt)).scalar_one_or_none()
            if account_id is None:
                raise AccountExists(user)
            if credentials:
                await session.execute(insert(AccountCredential), _rows(account_id, credentials))

    async def exists(self, user: str) -> bool:
        domain, username = split_user(user)
        async with self._sessions() as session:
            found = await session.scalar(
                select(Account.id).where(Account.domain == domain, Account.username == username)
            )
        return found is not None

    async def credentials(self, user: str, mechanism: str) -> ScramCredentials | None:
        """Read from the database at every login, never cached, so a password changed by
        another process (``natterctl user passwd``) takes effect at once."""
        domain, username = split_user(user)
        params = {"domain": domain, "username": username, "mechanism": mechanism}
        async with self._connect() as conn:
            row = (await conn.execute(_CREDENTIALS, params)).first()
        if row is None:
            return None
        salt, iterations, stored_key, server_key = row
        return ScramCredentials(mechanism, salt, iterations, stored_key, server_key)

    async def set_credentials(self, user: str, credentials: Sequence[ScramCredentials]) -> None:
        """Replace all credentials: a mechanism left out stops working, so an old password
        cannot survive a change in a family the caller forgot."""
        domain, username = split_user(user)
        _rows(0, credentials)
        async with self._sessions.begin() as session:
            account_id = await session.scalar(
                select(Account.id)
                .where(Account.domain == domain, Account.username == username)
                .with_for_update()
            )
            if account_id is None:
                raise AccountNotFound(user)
            await session.execute(
                delete(AccountCredential).where(AccountCredential.account_id == account_id)
            )
            if credentials:
                await session.execute(insert(AccountCredential), _rows(account_id, credentials))

    async def delete(self, user: str) -> bool:
        """Delete the account and everything stored for the user; True if the account existed."""
        domain, username = split_user(user)
        async with self._sessions.begin() as session:
            account_id = await session.scalar(
                delete(Account)
                .where(Account.domain == domain, Account.username == username)
                .returning(Account.id)
            )
            # Credentials go by ON DELETE CASCADE; per-user tables have no foreign key.
            for table in user_tables():
                await session.execute(
                    delete(table).where(table.domain == domain, table.username == username)
                )
        return account_id is not None

    async def list(self, domain: str) -> builtins.list[str]:
        async with self._sessions() as session:
            names = await session.scalars(select(Account.username).where(Account.domain == domain))
            # Sorted here, not by ORDER BY: database collations differ between backends.
            return sorted(f"{name}@{domain}" for name in names)

    async def info(self, user: str) -> AccountInfo | None:
        domain, username = split_user(user)
        async with self._sessions() as session:
            account = await session.scalar(
                select(Account).where(Account.domain == domain, Account.username == username)
            )
            if account is None:
                return None
            mechanisms = await session.scalars(
                select(AccountCredential.mechanism).where(
                    AccountCredential.account_id == account.id
                )
            )
            return AccountInfo(user, account.created_at, tuple(sorted(mechanisms)))
