"""Bad input gets the RFC 6120 §4.9 stream error, and everyone else keeps chatting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    HEADER,
    Client,
    RawClient,
    add_user,
    clients,
    next_matching,
    running_server,
)
from xmpp_server.server import Server


@contextlib.asynccontextmanager
async def chatting_pair(server: Server) -> AsyncIterator[tuple[Client, Client]]:
    a, b = await add_user(server, "alice"), await add_user(server, "bob")
    async with clients(Client(server, a), Client(server, b)) as (alice, bob):
        await alice.login()
        await bob.login()
        yield alice, bob


async def still_chatting(alice: Client, bob: Client, tag: str) -> None:
    alice.send_message(mto=bob.boundjid, mbody=f"still here {tag}", mtype="chat")
    await next_matching(bob.messages, lambda m: m["body"] == f"still here {tag}")


def stream_error(data: bytes, condition: bytes) -> bool:
    return (
        b"<stream:error><" + condition + b' xmlns="urn:ietf:params:xml:ns:xmpp-streams"' in data
        and data.rstrip().endswith(b"</stream:stream>")
    )


BAD_INPUTS = {
    "malformed": (b"<message><body>unclosed</message>", b"not-well-formed"),
    # Inside the stream a DOCTYPE is not even well-formed; before it, see the header test.
    "doctype-in-stream": (
        b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>]><message><body>&lol;</body></message>",
        b"not-well-formed",
    ),
    "comment": (b"<!-- hello --><message/>", b"restricted-xml"),
    "processing-instruction": (b"<?evil stuff?>", b"restricted-xml"),
    "undefined-entity": (b"<message><body>&xxe;</body></message>", b"not-well-formed"),
    "two-megabyte-stanza": (
        b"<message to='bob@localhost'><body>" + b"A" * (2 * 1024 * 1024) + b"</body></message>",
        b"policy-violation",
    ),
    "stanza-before-auth": (
        b"<message to='bob@localhost' type='chat'><body>hi</body></message>",
        b"not-authorized",
    ),
    "deep-nesting": (
        b"<message>" + b"<a>" * 100 + b"</a>" * 100 + b"</message>",
        b"policy-violation",
    ),
    "unknown-top-level-element": (b"<frobnicate xmlns='urn:example'/>", b"unsupported-stanza-type"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_gets_stream_error(migrated_db_url: str, tmp_path: Path, case: str) -> None:
    payload, condition = BAD_INPUTS[case]
    async with (
        running_server(migrated_db_url, tmp_path) as server,
        chatting_pair(server) as (alice, bob),
    ):
        raw = await RawClient.connect(server.c2s_port)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(payload)
        data = await raw.read_to_eof()
        raw.close()
        assert stream_error(data, condition), data[-400:]
        await still_chatting(alice, bob, case)


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (HEADER.replace(b"to='localhost'", b"to='elsewhere.example'"), b"host-unknown"),
        (HEADER.replace(b"xmlns='jabber:client'", b"xmlns='jabber:server'"), b"invalid-namespace"),
        (
            HEADER.replace(b"http://etherx.jabber.org/streams", b"urn:wrong"),
            b"invalid-namespace",
        ),
        (b"<?xml version='1.0'?><html><body>", b"not-well-formed"),
        (
            b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>"
            b"<!ENTITY lol3 '&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'>]>"
            + HEADER.removeprefix(b"<?xml version='1.0'?>")
            + b"<message><body>&lol3;</body></message>",
            b"restricted-xml",
        ),
    ],
    ids=[
        "host-unknown",
        "wrong-default-namespace",
        "wrong-stream-namespace",
        "not-a-stream",
        "doctype-entity-bomb",
    ],
)
async def test_bad_stream_header(
    migrated_db_url: str, tmp_path: Path, header: bytes, condition: bytes
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        raw = await RawClient.connect(server.c2s_port)
        await raw.send(header)
        data = await raw.read_to_eof()
        raw.close()
        # RFC 6120 §4.9.1.1: the server sends its own header before the error.
        assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
        assert stream_error(data, condition), data


async def test_malformed_xml_after_login(migrated_db_url: str, tmp_path: Path) -> None:
    async with (
        running_server(migrated_db_url, tmp_path) as server,
        chatting_pair(server) as (alice, bob),
    ):
        c = await add_user(server, "carol")
        async with clients(Client(server, c)) as (carol,):
            await carol.login()
            carol.send_raw("<message><body>oops</mesage>")
            error = await next_matching(carol.stream_errors, lambda e: True)
            assert error["condition"] == "not-well-formed"
        await still_chatting(alice, bob, "after carol")


async def test_idle_connection_times_out(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path, {"c2s": {"idle_timeout": 0.5}}) as server:
        raw = await RawClient.connect(server.c2s_port)
        await raw.send(HEADER)
        data = await raw.read_to_eof()
        raw.close()
        assert stream_error(data, b"connection-timeout")


async def test_flooding_client_is_slowed_not_others(migrated_db_url: str, tmp_path: Path) -> None:
    """The read-rate limit holds a flooder back while other clients are served."""
    overrides = {"c2s": {"read_rate": 20000, "read_burst": 20000}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        async with chatting_pair(server) as (alice, bob):
            raw = await RawClient.connect(server.c2s_port)
            await raw.send(HEADER)
            await raw.read_until(b"</stream:features>")
            flood = asyncio.ensure_future(raw.send(b" " * 400_000))
            await still_chatting(alice, bob, "during flood")
            flood.cancel()
            raw.close()


async def test_slow_reader_is_dropped_and_sender_unaffected(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """A client that stops reading cannot make the server buffer without bound."""
    overrides = {"limits": {"max_output_buffer": 65536}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        async with chatting_pair(server) as (alice, bob):
            bob.transport.pause_reading()
            chunk = "x" * 60000
            for i in range(400):
                alice.send_message(mto=bob.boundjid, mbody=f"{i} {chunk}", mtype="chat")
                if i % 20 == 0:
                    await alice.plugin["xep_0199"].ping("localhost", timeout=15)
                if not server.host.router.available(bob.boundjid.bare):
                    break
            assert not server.host.router.available(bob.boundjid.bare)
            await alice.plugin["xep_0199"].ping("localhost", timeout=15)
