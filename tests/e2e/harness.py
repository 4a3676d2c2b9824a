"""Run a real natterd on loopback ports and drive it with real clients (slixmpp, raw sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slixmpp

from tests.ports import free_udp_tcp_port as free_udp_tcp_port  # re-exported
from tests.ports import retry_on_port_clash
from xmpp_server.config import build_config
from xmpp_server.sasl import make_credentials
from xmpp_server.server import Server

DOMAIN = "localhost"
TIMEOUT = 15.0


@contextlib.asynccontextmanager
async def running_server(
    db_url: str, tmp_path: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> AsyncIterator[Server]:
    """A server on ephemeral loopback ports over ``db_url``, an already migrated database."""
    data: dict[str, Any] = {
        "server": {"domain": DOMAIN, "data_dir": str(tmp_path / "data")},
        "storage": {"url": db_url},
        "c2s": {"host": "127.0.0.1", "port": 0, "direct_tls_port": 0, "read_rate": 0},
        # Off unless a test turns it on with its own ports (0 means off, not "any port").
        "http": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    config = build_config(data, base_dir=tmp_path)
    server = await Server.start(config)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_server_on_free_ports(
    db_url: str, tmp_path: Path, overrides: Callable[[], dict[str, dict[str, Any]]]
) -> AsyncIterator[Server]:
    """``running_server`` with ``overrides()`` that pick free ports for listeners whose 0
    means off (STUN, HTTP): on a clash it starts again with ``overrides()`` called anew. Read
    the ports back from the server (``server.stun.addresses``, ``server.host.config``)."""
    async with contextlib.AsyncExitStack() as stack:
        server = await retry_on_port_clash(
            lambda: stack.enter_async_context(running_server(db_url, tmp_path, overrides()))
        )
        yield server


async def add_user(server: Server, local: str, password: str = "correct horse") -> str:
    jid = f"{local}@{DOMAIN}"
    await server.host.storage.accounts.create(jid, make_credentials(password, 4096))
    return jid


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects and which certificate it trusts."""

    c2s_port: int
    direct_tls_port: int | None
    cert_path: Path

    @classmethod
    def of(cls, server: Server | Endpoint) -> Endpoint:
        if isinstance(server, Endpoint):
            return server
        return cls(server.c2s_port, server.direct_tls_port, server.host.config.cert_path)


class Client(slixmpp.ClientXMPP):  # type: ignore[misc]
    """A slixmpp client that trusts the test server's self-signed certificate."""

    def __init__(
        self,
        server: Server | Endpoint,
        jid: str,
        password: str = "correct horse",
        *,
        mechanism: str | None = None,
        direct_tls: bool = False,
        stream_management: bool = False,
    ) -> None:
        kwargs = {"sasl_mech": mechanism} if mechanism else {}
        super().__init__(jid, password, **kwargs)
        self.natterd = Endpoint.of(server)
        self.direct_tls = direct_tls
        self.enable_direct_tls = direct_tls
        self.enable_starttls = not direct_tls
        self.enable_plaintext = False
        self.ssl_context = ssl.create_default_context(cafile=str(self.natterd.cert_path))
        self.messages = Mailbox()
        self.presences = Mailbox()
        self.stream_errors = Mailbox()
        self.auth_failures = Mailbox()
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("message_error", self.messages.put_nowait)
        self.add_event_handler("presence", self.presences.put_nowait)
        self.add_event_handler("stream_error", self.stream_errors.put_nowait)
        self.add_event_handler("failed_auth", self.auth_failures.put_nowait)
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        self.register_plugin("xep_0203")
        self.acked: list[Any] = []
        if stream_management:
            self.register_plugin("xep_0198")
            sm = self.plugin["xep_0198"]
            sm.window = sm.window_counter = 1  # ask for an ack after every stanza
            self.add_event_handler("stanza_acked", self.acked.append)

    def start(self) -> asyncio.Future[Any]:
        port = self.natterd.direct_tls_port if self.direct_tls else self.natterd.c2s_port
        return self.connect("127.0.0.1", port)

    async def login(self, *, presence: bool = True) -> None:
        self.start()
        await self.wait_until("session_start", TIMEOUT)
        if presence:
            self.send_presence()
            await self.get_roster()

    async def close(self) -> None:
        if self.is_connected():
            self.disconnect()
            with contextlib.suppress(Exception):
                await self.wait_until("disconnected", 5)


class Mailbox:
    """Everything of one kind a client received, kept so a test can wait for any of it."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._taken: set[int] = set()
        self._changed = asyncio.Event()

    def put_nowait(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def get(self) -> Any:
        return await next_matching(self, lambda _: True)


async def next_matching(
    box: Mailbox, predicate: Callable[[Any], bool], timeout: float = TIMEOUT, *, since: int = 0
) -> Any:
    """The first not yet taken item of ``box`` that satisfies ``predicate``, waiting for it;
    only items from index ``since`` on (``len(box.items)`` before sending: only answers)."""
    async with asyncio.timeout(timeout):
        while True:
            for index, item in enumerate(box.items):
                if index >= since and index not in box._taken and predicate(item):
                    box._taken.add(index)
                    return item
            box._changed.clear()
            await box._changed.wait()


@contextlib.asynccontextmanager
async def clients(*items: Client) -> AsyncIterator[tuple[Client, ...]]:
    try:
        yield items
    finally:
        for client in items:
            await client.close()


class RawClient:
    """A bare TCP client for protocol violations no library would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def read_until(self, marker: bytes, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            while marker not in self.received:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                self.received += chunk
        return self.received

    async def read_to_eof(self, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                self.received += chunk
        return self.received

    def close(self) -> None:
        self.writer.close()


HEADER = (
    b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)

logging.getLogger("slixmpp").setLevel(logging.WARNING)
