"""XEP-0077 in-band registration with slixmpp's plugin: off by default, then on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import slixmpp.exceptions

from tests.e2e.harness import Client, add_user, clients, next_matching, running_server
from xmpp_server.server import Server

ENABLED = {"modules": {"register": {"enabled": True}}}


class Registrant(Client):
    """Registers its JID on the unauthenticated stream, then logs in with it."""

    def __init__(self, server: Server, jid: str, password: str = "correct horse") -> None:
        super().__init__(server, jid, password)
        self.register_plugin("xep_0077")
        self.plugin["xep_0077"].force_registration = True
        self.results: list[Any] = []
        self.add_event_handler("register", self.on_register)

    async def on_register(self, _form: Any) -> None:
        request = self.Iq()
        request["type"] = "set"
        request["register"]["username"] = self.boundjid.user
        request["register"]["password"] = self.password
        try:
            self.results.append(await request.send())
        except slixmpp.exceptions.IqError as exc:
            self.results.append(exc.iq)
            self.disconnect()


async def test_register_creates_an_account(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path, ENABLED) as server:
        async with clients(Registrant(server, "newbie@localhost")) as (newbie,):
            await newbie.login()
            assert newbie.results[0]["type"] == "result"
            assert await server.host.storage.accounts.exists("newbie@localhost")
        # And the password works for a normal login afterwards.
        async with clients(Client(server, "newbie@localhost")) as (again,):
            await again.login()


async def test_register_taken_username_is_conflict(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path, ENABLED) as server:
        await add_user(server, "alice", "original password")
        async with clients(Registrant(server, "alice@localhost", "hijack attempt")) as (thief,):
            thief.start()
            await thief.wait_until("disconnected", 15)
            assert thief.results[0]["type"] == "error"
            assert thief.results[0]["error"]["condition"] == "conflict"
        async with clients(Client(server, "alice@localhost", "original password")) as (alice,):
            await alice.login()


async def test_register_is_off_by_default(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with clients(Registrant(server, "newbie@localhost")) as (newbie,):
            newbie.start()
            failure = await next_matching(newbie.auth_failures, lambda f: True)
            assert failure["condition"] == "not-authorized"
            assert newbie.results == []
            assert not await server.host.storage.accounts.exists("newbie@localhost")
