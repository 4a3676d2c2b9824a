"""XEP-0114 external components, server side: a trusted process (the ``natterd push`` app
server, a gateway) connects, proves it knows its domain's secret, and from then on gets
every stanza addressed to that domain and may send stanzas from it.

:class:`ComponentStream` is the sans-IO part (header, handshake, stanzas in and out);
:class:`ComponentListener` is the asyncio shell: the ``[components]`` listener, one
:class:`ComponentConnection` per component, and the router's domain handlers.

On the wire, stanzas are in ``jabber:component:accept``; inside natterd they are in
``jabber:client`` like everything else (retagged on input; serialized unprefixed on output,
so they take the component stream's default namespace).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xmpp_server.errors import NS_STREAM_ERRORS, NS_STREAMS, ServiceUnavailable, StreamError
from xmpp_server.jid import JID
from xmpp_server.stanza import qn
from xmpp_server.xml import (
    NS_CLIENT,
    Element,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XmlLimits,
    XmlStreamParser,
    escape_attr,
    tobytes,
)

if TYPE_CHECKING:
    from xmpp_server.router import Session
    from xmpp_server.server import Host

log = logging.getLogger("natterd.component")

NS_COMPONENT = "jabber:component:accept"
HANDSHAKE = qn(NS_COMPONENT, "handshake")
_COMPONENT_PREFIX = f"{{{NS_COMPONENT}}}"
_STANZAS = frozenset(qn(NS_COMPONENT, local) for local in ("message", "presence", "iq"))
READ_SIZE = 65536
HANDSHAKE_TIMEOUT = 30.0


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 §3: lowercase hex SHA-1 of the stream id followed by the secret."""
    return hashlib.sha1((stream_id + secret).encode()).hexdigest()


def to_client_ns(el: Element) -> Element:
    """Move ``el`` and its descendants from the component namespace to ``jabber:client``."""
    for node in el.iter():
        if node.tag.startswith(_COMPONENT_PREFIX):
            node.tag = f"{{{NS_CLIENT}}}" + node.tag[len(_COMPONENT_PREFIX) :]
    return el


# -- sans-IO ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ComponentAuthenticated:
    domain: str


@dataclass(frozen=True, slots=True)
class ComponentStanza:
    stanza: Element  # in jabber:client, 'from' checked to be in the component's domain


@dataclass(frozen=True, slots=True)
class ComponentEnded:
    error: StreamError | None


ComponentEvent = ComponentAuthenticated | ComponentStanza | ComponentEnded


class ComponentStream:
    """One component stream from the server's side; ``secrets`` maps domain → secret."""

    def __init__(self, secrets: Mapping[str, str], limits: XmlLimits | None = None) -> None:
        self.secrets = secrets
        self.domain: str | None = None  # the domain the component asked for
        self.authenticated = False
        self.closed = False
        self.stream_id = base64.b32encode(os.urandom(10)).decode().lower()
        # Until the handshake an unknown peer gets the small pre-auth byte budget, as on c2s.
        self._limits = limits or XmlLimits()
        self._parser = XmlStreamParser(
            self._limits, budget=self._limits.max_stanza_size_before_auth
        )
        self._out: list[bytes] = []
        self._header_sent = False

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def send(self, stanza: Element) -> None:
        if self.authenticated and not self.closed:
            self._out.append(tobytes(stanza, NS_CLIENT))

    def close(self, error: StreamError | None = None) -> list[ComponentEvent]:
        events: list[ComponentEvent] = []
        if not self.closed:
            if error is not None:
                self._fail(error, events)
            else:
                self._out.append(b"</stream:stream>")
                self.closed = True
                events.append(ComponentEnded(None))
        return events

    def receive_data(self, data: bytes) -> list[ComponentEvent]:
        events: list[ComponentEvent] = []
        if self.closed:
            return events
        try:
            for ev in self._parser.feed(data):
                if isinstance(ev, StreamOpened):
                    self._opened(ev)
                elif isinstance(ev, ElementReceived):
                    self._element(ev.element, events)
                elif isinstance(ev, StreamClosed):
                    self._out.append(b"</stream:stream>")
                    self.closed = True
                    events.append(ComponentEnded(None))
                if self.closed:
                    break
        except StreamError as exc:
            self._fail(exc, events)
        return events

    def _header(self) -> bytes:
        return (
            f"<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' "
            f"xmlns:stream='{NS_STREAMS}' id='{self.stream_id}' "
            f"from='{escape_attr(self.domain or '')}'>"
        ).encode()

    def _opened(self, ev: StreamOpened) -> None:
        self.domain = ev.attrs.get("to", "")
        self._out.append(self._header())
        self._header_sent = True
        if ev.default_ns != NS_COMPONENT:
            raise StreamError("invalid-namespace", f"components speak {NS_COMPONENT}")
        if self.domain not in self.secrets:
            raise StreamError("host-unknown", f"no component {self.domain!r} is configured")

    def _element(self, el: Element, events: list[ComponentEvent]) -> None:
        if not self.authenticated:
            if el.tag != HANDSHAKE or self.domain is None:
                raise StreamError("not-authorized", "send the handshake first")
            expected = handshake_digest(self.stream_id, self.secrets[self.domain])
            if not hmac.compare_digest((el.text or "").strip().lower(), expected):
                raise StreamError("not-authorized", "wrong handshake")
            self.authenticated = True
            self._parser.budget = self._limits.max_stanza_size
            self._out.append(f"<handshake xmlns='{NS_COMPONENT}'/>".encode())
            events.append(ComponentAuthenticated(self.domain))
            return
        if el.tag not in _STANZAS:
            raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")
        stanza = to_client_ns(el)
        sender = stanza.get("from")
        if not sender:
            stanza.set("from", self.domain or "")
        else:
            try:
                domain = JID.parse(sender).domain
            except ValueError:
                raise StreamError("invalid-from", "malformed 'from'") from None
            if domain != self.domain:
                raise StreamError("invalid-from", f"components send from {self.domain} only")
        events.append(ComponentStanza(stanza))

    def _fail(self, exc: StreamError, events: list[ComponentEvent]) -> None:
        if self.closed:
            return
        if not self._header_sent:
            self._out.append(self._header())
            self._header_sent = True
        condition = f"<{exc.condition} xmlns='{NS_STREAM_ERRORS}'/>"
        self._out.append(f"<stream:error>{condition}</stream:error></stream:stream>".encode())
        self.closed = True
        events.append(ComponentEnded(exc))


# -- asyncio shell ----------------------------------------------------------------------


class ComponentConnection:
    def __init__(
        self,
        listener: ComponentListener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.listener = listener
        self.reader = reader
        self.writer = writer
        self.stream = ComponentStream(listener.secrets, listener.limits)
        self.domain: str | None = None

    def send(self, stanza: Element) -> None:
        self.stream.send(stanza)
        self._flush()

    def close(self, error: StreamError | None = None) -> None:
        self.stream.close(error)
        self._flush()
        self.writer.close()

    def _flush(self) -> None:
        data = self.stream.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        router = self.listener.host.router
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT) as deadline:
                while not self.stream.closed:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    for event in self.stream.receive_data(data):
                        if isinstance(event, ComponentAuthenticated):
                            deadline.reschedule(None)
                            if self.listener.connected.get(event.domain) is not None:
                                self.stream.close(StreamError("conflict", "already connected"))
                                break
                            self.domain = event.domain
                            self.listener.connected[event.domain] = self
                            log.info("component %s connected", event.domain)
                        elif isinstance(event, ComponentStanza):
                            await router.deliver(event.stanza)
                    self._flush()
                    await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.info("component connection ended: %s", exc or type(exc).__name__)
        finally:
            self._flush()
            if self.domain is not None and self.listener.connected.get(self.domain) is self:
                del self.listener.connected[self.domain]
                log.info("component %s disconnected", self.domain)
            if not self.writer.is_closing():
                self.writer.close()


class ComponentListener:
    """The ``[components]`` port; stanzas for a configured domain go to its connection."""

    def __init__(self, host: Host) -> None:
        self.host = host
        config = host.config.components
        self.secrets = {entry.domain: entry.secret for entry in config.services}
        self.limits = host.stream_settings.limits
        self.connected: dict[str, ComponentConnection] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for domain in self.secrets:
            host.router.add_domain(domain, self._to_component)

    async def _to_component(self, origin: Session | None, stanza: Element, to: JID) -> None:
        connection = self.connected.get(to.domain)
        if connection is None:
            raise ServiceUnavailable(f"{to.domain} is not connected")
        connection.send(stanza)

    async def start(self) -> None:
        config = self.host.config.components
        hosts: list[str] = list(config.host)
        self._server = await asyncio.start_server(self._accept, hosts, config.port)
        for sock in self._server.sockets:
            log.info("components listening on %s", sock.getsockname()[:2])

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await ComponentConnection(self, reader, writer).run()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connected.values()):
            connection.close(StreamError("system-shutdown"))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
