"""A raw XMPP client on a real socket, for input no library would send and for ending a stream
in ways no library would: a TCP reset, TLS closed without close_notify, bytes cut mid-stanza.

It speaks just enough to reach any stage of a session by hand: the stream header, STARTTLS or
direct TLS (XEP-0368), SASL PLAIN (offered only over TLS), resource binding and XEP-0198.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
import struct
from pathlib import Path

DOMAIN = "localhost"
TIMEOUT = 15.0
HEADER = (
    "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SM = "urn:xmpp:sm:3"
_BOUND_JID = re.compile(rb"<jid>([^<]+)</jid>")


def header(domain: str = DOMAIN) -> bytes:
    return HEADER.format(domain=domain).encode()


def plain_auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>".encode()


def bind_request(resource: str | None, iq_id: str = "bind-1") -> bytes:
    res = f"<resource>{resource}</resource>" if resource else ""
    return f"<iq type='set' id='{iq_id}'><bind xmlns='{NS_BIND}'>{res}</bind></iq>".encode()


def tls_context(cert_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_path))


class Wire:
    """One client connection: bytes out, everything received kept in ``received``.

    ``expect`` waits for a marker after what earlier calls consumed, so a test can step
    through a conversation without matching an old answer twice."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""
        self._seen = 0  # ``received`` up to here was consumed by ``expect``
        self.jid: str | None = None

    @classmethod
    async def open(
        cls, port: int, cert_path: Path, *, direct_tls: bool = True, starttls: bool = True
    ) -> Wire:
        """Connect; with ``direct_tls`` TLS starts at once (XEP-0368), otherwise STARTTLS is
        negotiated when ``starttls`` (the stream is then at its restarted header)."""
        context = tls_context(cert_path)
        if direct_tls:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=DOMAIN
            )
            return cls(reader, writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = cls(reader, writer)
        if starttls:
            await wire.send(header())
            await wire.expect(b"</stream:features>")
            await wire.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            await wire.expect(b"<proceed")
            await writer.start_tls(context, server_hostname=DOMAIN)
        return wire

    # -- bytes ------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def expect(self, marker: bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait until ``marker`` arrives; return what came up to and including it."""
        async with asyncio.timeout(timeout):
            while (found := self.received.find(marker, self._seen)) < 0:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(f"closed before {marker!r}: {self.received[-300:]!r}")
                self.received += chunk
        start, self._seen = self._seen, found + len(marker)
        return self.received[start : self._seen]

    async def until_closed(self, timeout: float = TIMEOUT) -> bytes:
        """Everything the server sends until it closes the connection."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while chunk := await self.reader.read(65536):
                    self.received += chunk
        return self.received[self._seen :]

    # -- session stages ---------------------------------------------------------------

    async def open_stream(self) -> bytes:
        await self.send(header())
        return await self.expect(b"</stream:features>")

    async def authenticate(self, user: str, password: str = "correct horse") -> None:
        """Stream header and SASL PLAIN (local part ``user``), up to the restarted stream."""
        await self.open_stream()
        await self.send(plain_auth(user, password))
        answer = await self.expect(b"</success>")
        assert b"<success" in answer, answer
        await self.open_stream()

    async def bind(self, resource: str | None = None) -> str:
        await self.send(bind_request(resource))
        answer = await self.expect(b"</iq>")
        match = _BOUND_JID.search(answer)
        assert match is not None, answer
        self.jid = match.group(1).decode()
        return self.jid

    async def login(
        self, user: str, resource: str | None = None, *, password: str = "correct horse"
    ) -> str:
        await self.authenticate(user, password)
        return await self.bind(resource)

    async def enable_sm(self, *, resume: bool = False) -> bytes:
        attrs = " resume='true'" if resume else ""
        await self.send(f"<enable xmlns='{NS_SM}'{attrs}/>".encode())
        return await self.expect(b"<enabled")

    async def presence(self) -> None:
        await self.send(b"<presence/>")

    # -- ways to end ------------------------------------------------------------------

    async def close_stream(self) -> bytes:
        """The polite end: ``</stream:stream>``, then wait for the server's."""
        await self.send(b"</stream:stream>")
        return await self.until_closed()

    def reset(self) -> None:
        """End with a TCP reset (SO_LINGER 0), no XMPP or TLS goodbye."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def drop_tls(self) -> None:
        """End TLS without close_notify: a bare TCP FIN under the TLS session."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.writer.transport.abort()
