"""Defect 7 of issue 13: failed logins from elsewhere must not lock the owner out.

Clients bind their sockets to other loopback addresses (127.0.0.2, ...) to come from
distinct source addresses, as an attacker on another network would."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.e2e.harness import add_user, clients, running_server
from tests.e2e.sources import OWNER, SourcedClient, needs_loopback_aliases
from tests.e2e.test_announce import ctl_config, natterctl


async def fail_login(server: Any, jid: str, source: str) -> str:
    """One login with a wrong password from ``source``; the SASL failure condition."""
    async with clients(SourcedClient(server, jid, "wrong", source=source)) as (bad,):
        bad.start()
        failure = await asyncio.wait_for(bad.auth_failures.get(), 15)
        return str(failure["condition"])


async def login_condition(server: Any, jid: str, source: str) -> str:
    """Log in with the right password from ``source``: "ok" or the SASL failure."""
    async with clients(SourcedClient(server, jid, source=source)) as (client,):
        client.start()
        done = asyncio.ensure_future(client.wait_until("session_start", 15))
        failed = asyncio.ensure_future(client.auth_failures.get())
        finished, pending = await asyncio.wait(
            {done, failed}, timeout=15, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        assert finished, "neither logged in nor refused"
        if failed in finished:
            return str(failed.result()["condition"])
        return "ok"


pytestmark = needs_loopback_aliases


async def test_attacker_elsewhere_cannot_lock_out_the_owner(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        assert await login_condition(server, jid, OWNER) == "ok"  # the owner's usual network
        # Many wrong passwords from many other addresses, far past every threshold.
        for i in range(30):
            assert await fail_login(server, jid, f"127.0.0.{2 + i % 6}") in (
                "not-authorized",
                "temporary-auth-failure",
            )
        assert await fail_login(server, jid, "127.0.0.2") == "temporary-auth-failure"
        # The attackers are held back, the owner is not.
        assert await login_condition(server, jid, OWNER) == "ok"
        # A new address of the owner's waits out the account-wide lock ... or the admin
        # forgives the account.
        assert await login_condition(server, jid, "127.0.0.9") == "temporary-auth-failure"
        config = ctl_config(tmp_path)
        assert await natterctl(config, "user", "unlock", jid) == 0
        assert await login_condition(server, jid, "127.0.0.9") == "ok"


async def test_unlock_one_address(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"auth": {"max_failures": 2, "lockout": 300.0}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        jid = await add_user(server, "alice")
        for _ in range(2):
            assert await fail_login(server, jid, "127.0.0.5") == "not-authorized"
        assert await login_condition(server, jid, "127.0.0.5") == "temporary-auth-failure"
        assert await login_condition(server, jid, "127.0.0.6") == "ok"
        config = ctl_config(tmp_path)
        assert await natterctl(config, "user", "unlock", jid, "--address", "127.0.0.5") == 0
        assert await login_condition(server, jid, "127.0.0.5") == "ok"
        assert await natterctl(config, "user", "unlock", jid, "--address", "nonsense") == 2
        assert await natterctl(config, "user", "unlock", "bob@elsewhere") == 2
