"""An iq of the wrong shape is answered with bad-request, never with silence, and a malformed
result or error is dropped unanswered (issue 13, defect 8; RFC 6120 §8.2.3)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.harness import DOMAIN, add_user, running_server
from tests.e2e.wire import Wire
from xmpp_server.server import Server

BAD_REQUEST = b'<bad-request xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"'


@contextlib.asynccontextmanager
async def alice_and_bob(server: Server) -> AsyncIterator[tuple[Wire, Wire, str]]:
    await add_user(server, "alice")
    await add_user(server, "bob")
    cert = server.host.config.cert_path
    alice = await Wire.open(server.direct_tls_port or 0, cert)
    bob = await Wire.open(server.direct_tls_port or 0, cert)
    try:
        await alice.login("alice", "desk")
        bob_full = await bob.login("bob", "phone")
        await bob.presence()
        yield alice, bob, bob_full
    finally:
        alice.close()
        bob.close()


async def ping(wire: Wire, tag: str) -> bytes:
    """Everything ``wire`` got before the answer to a well-formed ping, that answer included."""
    await wire.send(
        f"<iq type='get' id='{tag}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>".encode()
    )
    return await wire.expect(f'id="{tag}"'.encode())


REQUESTS = {
    "no-id": "<iq type='get' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>",
    "empty-id": "<iq type='get' id='' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>",
    "no-type": "<iq id='q1' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>",
    "unknown-type": "<iq type='fetch' id='q1' to='{domain}'><ping xmlns='urn:xmpp:ping'/></iq>",
    "get-without-child": "<iq type='get' id='q1' to='{domain}'/>",
    "set-with-two-children": (
        "<iq type='set' id='q1' to='{bob}'><query xmlns='jabber:iq:version'/>"
        "<ping xmlns='urn:xmpp:ping'/></iq>"
    ),
    "to-own-account-without-id": "<iq type='get'><query xmlns='jabber:iq:roster'/></iq>",
}


@pytest.mark.parametrize("case", sorted(REQUESTS))
async def test_malformed_request_gets_bad_request(
    migrated_db_url: str, tmp_path: Path, case: str
) -> None:
    async with (
        running_server(migrated_db_url, tmp_path) as server,
        alice_and_bob(server) as (alice, bob, bob_full),
    ):
        await alice.send(REQUESTS[case].format(domain=DOMAIN, bob=bob_full).encode())
        answer = await alice.expect(b"</iq>")
        assert b'type="error"' in answer and BAD_REQUEST in answer, answer
        # Nothing of it reached Bob, and both are still served.
        await alice.send(
            f"<message to='{bob_full}' type='chat'><body>marker</body></message>".encode()
        )
        assert b"<iq" not in await bob.expect(b"marker")
        await ping(alice, "after")


ANSWERS = {
    "result-without-id": "<iq type='result' to='{bob}'/>",
    "error-without-id": "<iq type='error' to='{bob}'><error type='cancel'/></iq>",
    "error-without-error": "<iq type='error' id='e1' to='{bob}'/>",
    "result-with-two-children": (
        "<iq type='result' id='r1' to='{bob}'><a xmlns='urn:a'/><b xmlns='urn:b'/></iq>"
    ),
    "result-to-server-without-id": "<iq type='result' to='{domain}'/>",
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
async def test_malformed_answer_is_dropped_unanswered(
    migrated_db_url: str, tmp_path: Path, case: str
) -> None:
    async with (
        running_server(migrated_db_url, tmp_path) as server,
        alice_and_bob(server) as (alice, bob, bob_full),
    ):
        await alice.send(ANSWERS[case].format(domain=DOMAIN, bob=bob_full).encode())
        # The next thing Alice gets is the answer to her ping: no error came back.
        before = await ping(alice, "after")
        assert b"<iq" not in before.rpartition(b"<iq")[0], before
        assert b'type="error"' not in before, before
        await alice.send(
            f"<message to='{bob_full}' type='chat'><body>marker</body></message>".encode()
        )
        assert b"<iq" not in await bob.expect(b"marker")
