"""Logging in over real sockets with slixmpp: RFC 6120 §5 (TLS), §6 (SASL), §7 (binding)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from tests.e2e.harness import HEADER, Client, RawClient, add_user, clients, running_server


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
async def test_login_over_starttls(migrated_db_url: str, tmp_path: Path, mechanism: str) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid, mechanism=mechanism)) as (alice,):
            await alice.login()
            assert alice.boundjid.bare == jid
            assert alice.boundjid.resource
            assert alice.socket.version() in ("TLSv1.2", "TLSv1.3")
            # A round trip through the router proves the session works.
            await alice.plugin["xep_0199"].ping("localhost", timeout=10)


async def test_login_over_direct_tls(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid, direct_tls=True)) as (alice,):
            await alice.login()
            assert alice.boundjid.bare == jid


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "PLAIN"])
async def test_wrong_password_is_not_authorized(
    migrated_db_url: str, tmp_path: Path, mechanism: str
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid, "wrong", mechanism=mechanism)) as (alice,):
            alice.start()
            failure = await asyncio.wait_for(alice.auth_failures.get(), 15)
            assert failure["condition"] == "not-authorized"


async def test_unknown_user_is_not_authorized(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        async with clients(Client(server, "nobody@localhost")) as (client,):
            client.start()
            failure = await asyncio.wait_for(client.auth_failures.get(), 15)
            assert failure["condition"] == "not-authorized"


async def test_plain_is_not_offered_before_tls(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        raw = await RawClient.connect(server.c2s_port)
        await raw.send(HEADER)
        data = await raw.read_until(b"</stream:features>")
        raw.close()
        assert b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"><required/></starttls>' in data
        assert b"PLAIN" not in data and b"mechanism" not in data


async def test_auth_before_tls_is_refused(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        raw = await RawClient.connect(server.c2s_port)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            b"AGFsaWNlAGNvcnJlY3QgaG9yc2U=</auth>"
        )
        data = await raw.read_until(b"</failure>")
        raw.close()
        assert b"<encryption-required/>" in data


async def test_plain_and_plus_offered_after_tls(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        context = ssl.create_default_context(cafile=str(server.host.config.cert_path))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.direct_tls_port, ssl=context, server_hostname="localhost"
        )
        raw = RawClient(reader, writer)
        await raw.send(HEADER)
        data = await raw.read_until(b"</stream:features>")
        raw.close()
        for mechanism in (b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256", b"SCRAM-SHA-1", b"PLAIN"):
            assert b"<mechanism>" + mechanism + b"</mechanism>" in data
        assert b'<channel-binding type="tls-server-end-point"/>' in data


async def test_failed_logins_are_throttled(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"auth": {"max_failures": 2, "lockout": 300.0}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        jid = await add_user(server, "alice")
        for _ in range(2):
            async with clients(Client(server, jid, "wrong")) as (bad,):
                bad.start()
                failure = await asyncio.wait_for(bad.auth_failures.get(), 15)
                assert failure["condition"] == "not-authorized"
        # Now even the right password is refused for a while.
        async with clients(Client(server, jid)) as (alice,):
            alice.start()
            failure = await asyncio.wait_for(alice.auth_failures.get(), 15)
            assert failure["condition"] == "temporary-auth-failure"


async def test_new_session_with_same_resource_replaces_old(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, f"{jid}/phone"), Client(server, f"{jid}/phone")) as (
            first,
            second,
        ):
            await first.login()
            await second.login()
            error = await asyncio.wait_for(first.stream_errors.get(), 15)
            assert error["condition"] == "conflict"
            assert second.boundjid.full == f"{jid}/phone"
            await second.plugin["xep_0199"].ping("localhost", timeout=10)


async def test_server_generates_a_resource(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid), Client(server, jid)) as (one, two):
            await one.login()
            await two.login()
            assert one.boundjid.resource and two.boundjid.resource
            assert one.boundjid.resource != two.boundjid.resource


async def test_max_failures_zero_turns_the_lockout_off(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path, {"auth": {"max_failures": 0}}) as server:
        jid = await add_user(server, "alice")
        for _ in range(6):
            async with clients(Client(server, jid, "wrong")) as (bad,):
                bad.start()
                failure = await asyncio.wait_for(bad.auth_failures.get(), 15)
                assert failure["condition"] == "not-authorized"
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
