"""Build everything from the config, open the listeners, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import resource
import signal
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from xmpp_server import control, sasl, tls
from xmpp_server.config import Config
from xmpp_server.connection import Connection
from xmpp_server.errors import StreamError
from xmpp_server.jid import JID
from xmpp_server.login_guard import GuardLimits, LoginGuard, network_of
from xmpp_server.mailbox import Mailbox
from xmpp_server.modules import build_modules
from xmpp_server.modules.base import Module
from xmpp_server.modules.register import Register
from xmpp_server.router import Router
from xmpp_server.storage import Storage
from xmpp_server.stream import StreamSettings
from xmpp_server.xml import Element, XmlLimits

if TYPE_CHECKING:
    from stun.service import StunService
    from xmpp_server.component import ComponentListener
    from xmpp_server.http.server import HttpServer

log = logging.getLogger("natterd")

STOP_TIMEOUT = 10.0  # seconds connections get to wind down on shutdown
# Connections the kernel may queue before accept(); asyncio's default of 100 overflows in a
# login burst, and each dropped SYN costs that client a 1 s (then 3 s, 7 s) retransmission.
# The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


@dataclass
class Host:
    """Everything a connection or module needs to reach: one per served domain."""

    config: Config
    storage: Storage
    router: Router
    ssl_context: ssl.SSLContext
    bindings: sasl.ChannelBindings
    stream_settings: StreamSettings
    login_guard: LoginGuard
    modules: dict[str, Module] = field(default_factory=dict)
    started_at: float = 0.0
    known_accounts: KnownAccounts | None = None
    # XEP-0198 sessions that may be resumed, by SM id (connected or detached).
    resumable: dict[str, Connection] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # Top-level elements after binding (``StreamSettings.nonza_namespaces``), by namespace.
    nonza_handlers: dict[str, Callable[[Connection, Element], None]] = field(default_factory=dict)
    # XEP-0352: what an inactive session gets of a stanza (set by the csi module).
    inactive_policy: Callable[[Element], Literal["send", "hold", "drop"]] | None = None
    # Group commit of the mailbox table (set by the offline module): acks wait for it.
    mailbox: Mailbox | None = None

    @property
    def domain(self) -> str:
        return self.config.server.domain


class KnownAccounts:
    """Which accounts exist, asked for every message to an offline user: a positive answer
    is remembered for a while (accounts are created by natterctl in another process, so a
    negative one never is). Deleting an account here forgets it at once."""

    TTL = 60.0
    SIZE = 100_000

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._seen: OrderedDict[JID, float] = OrderedDict()

    async def exists(self, jid: JID) -> bool:
        bare = jid.bare
        now = time.monotonic()
        seen = self._seen.get(bare)
        if seen is not None and now - seen < self.TTL:
            return True
        if not await self.storage.accounts.exists(str(bare)):
            self._seen.pop(bare, None)
            return False
        self._seen[bare] = now
        self._seen.move_to_end(bare)
        if len(self._seen) > self.SIZE:
            self._seen.popitem(last=False)
        return True

    def forget(self, jid: JID) -> None:
        self._seen.pop(jid.bare, None)


def entitled(storage: Storage) -> Callable[[JID, JID], Awaitable[bool]]:
    """The router's test for who may see an account's errors: contacts the account has
    granted a presence subscription to (RFC 6121 §4), as for presence itself."""

    async def check(account: JID, requester: JID) -> bool:
        item = await storage.rosters.get(str(account), str(requester.bare))
        return item is not None and item.subscription in ("from", "both")

    return check


class Server:
    """A running natterd: ``await Server.start(config)``, then ``await server.stop()``."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._servers: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._per_ip: dict[str, int] = {}
        self._refusal_logged = 0.0
        self.control: control.ControlServer | None = None
        self.stun: StunService | None = None
        self.http: HttpServer | None = None
        self.components: ComponentListener | None = None

    @classmethod
    async def start(cls, config: Config) -> Server:
        storage = await Storage.open(config.storage.url)
        try:
            cert, key = tls.ensure_certificate(config)
            context = tls.server_context(cert, key, config.tls.min_version)
            tls.limit_asyncio_tls_buffers()
            bindings = sasl.ChannelBindings(
                {"tls-server-end-point": sasl.tls_server_end_point(tls.certificate_der(cert))}
            )
            domain = config.server.domain
            limits = config.limits
            settings = StreamSettings(
                domain=domain,
                require_tls=config.c2s.require_tls,
                mechanisms=tuple(config.auth.mechanisms),
                limits=XmlLimits(
                    max_stanza_size=limits.max_stanza_size,
                    max_stanza_size_before_auth=limits.max_stanza_size_before_auth,
                    max_depth=limits.max_depth,
                    max_attributes=limits.max_attributes,
                    max_attribute_value=limits.max_attribute_value,
                ),
                fake_secret=hmac.new(
                    key.read_bytes(), b"natterd fake SCRAM salt", "sha256"
                ).digest(),
                scram_iterations=config.auth.scram_iterations,
                stream_management=config.c2s.stream_management,
            )

            known = KnownAccounts(storage)

            auth = config.auth
            on = auth.max_failures > 0  # 0 turns every login lockout off
            guard = GuardLimits(
                per_pair=auth.max_failures,
                per_address=auth.max_failures_per_address if on else 0,
                per_account=auth.max_failures_per_account if on else 0,
                window=auth.failure_window,
                lockout=auth.lockout,
            )
            host = Host(
                config=config,
                storage=storage,
                router=Router(domain, known.exists, entitled(storage)),
                known_accounts=known,
                ssl_context=context,
                bindings=bindings,
                stream_settings=settings,
                login_guard=LoginGuard(guard),
                started_at=asyncio.get_running_loop().time(),
            )
            host.modules = build_modules(host)
            register = host.modules.get("register")
            if isinstance(register, Register) and register.options.allow_new_accounts:
                host.stream_settings = replace(settings, registration=True)
            for module in host.modules.values():
                module.setup()
            for module in host.modules.values():
                await module.start()
            server = cls(host)
            try:
                await server._start_stun()
                await server._start_http()
                await server._start_components()
                await server._listen()
            except BaseException:
                # A port already taken fails here; undo everything so that the caller can
                # start again (on another port) in the same process.
                await server._abandon()
                raise
        except BaseException:
            await storage.close()
            raise
        return server

    async def _abandon(self) -> None:
        """Undo a start that failed half-way: listeners, control socket, modules' tasks."""
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        self._servers.clear()
        if self.control is not None:
            await self.control.close()
            self.control = None
        await self._stop_components()
        await self._stop_http()
        for module in self.host.modules.values():
            await module.stop()
        await self._stop_stun()

    # STUN/TURN (issue 6): its own sockets and state, started first and stopped last.
    async def _start_stun(self) -> None:
        if self.host.config.stun.enabled:
            from stun.service import StunService

            self.stun = await StunService.start(self.host.config)

    # HTTP (issue 5): aiohttp on its own ports, routes from the modules; stopped before them.
    async def _start_http(self) -> None:
        if self.host.config.http.enabled:
            from xmpp_server.http.server import HttpServer

            self.http = await HttpServer.start(self.host)

    # XEP-0114 (issue 5): external components such as the `natterd push` app server.
    async def _start_components(self) -> None:
        if self.host.config.components.enabled:
            from xmpp_server.component import ComponentListener

            self.components = ComponentListener(self.host)
            await self.components.start()

    async def _stop_components(self) -> None:
        if self.components is not None:
            await self.components.stop()
            self.components = None

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None

    async def _stats(self, _: dict[str, Any]) -> dict[str, Any]:
        """Counters for ``natterctl stats`` (JSON): what a metrics exporter will publish."""
        router = self.host.router
        stats: dict[str, Any] = {
            "connections": len(self._connections),
            "accounts_online": len(router.sessions),
            "sessions": sum(len(resources) for resources in router.sessions.values()),
            "resumable_sessions": len(self.host.resumable),
        }
        muc = self.host.modules.get("muc")
        if muc is not None:
            rooms = getattr(muc, "rooms", {})
            stats["muc"] = {
                "rooms_loaded": len(rooms),
                "occupants": sum(len(room.occupants) for room in rooms.values()),
            }
        if self.stun is not None:
            stats["stun"] = self.stun.stats.snapshot()
        jingle = self.host.modules.get("jingle")
        anchor = getattr(jingle, "anchor", None)
        if anchor is not None:
            stats["relay"] = anchor.relay.metrics()
        voicemail = getattr(jingle, "voicemail", None)
        if voicemail is not None:
            stats["voicemail"] = {"recording": len(voicemail.sessions)}
        conference = self.host.modules.get("conference")
        if conference is not None:
            conferences = getattr(conference, "conferences", {})
            stats["conferences"] = {
                "active": len(conferences),
                "participants": sum(len(c.participants) for c in conferences.values()),
            }
        return {"stats": stats}

    async def _unlock(self, request: dict[str, Any]) -> dict[str, Any]:
        """``natterctl user unlock JID [--address A]``: forgive the login failures held
        against an account (everywhere, or only those of one address)."""
        try:
            jid = JID.parse(str(request.get("jid", "")))
        except ValueError as exc:
            raise control.ControlError(f"not a JID: {exc}") from None
        if jid.local is None or jid.domain != self.host.domain:
            raise control.ControlError(f"not an account of {self.host.domain}: {jid}")
        address = request.get("address")
        if address is not None and not isinstance(address, str):
            raise control.ControlError("address must be a string")
        self.host.login_guard.unlock(str(jid.bare), address)
        return {"jid": str(jid.bare), "address": address}

    async def _stop_stun(self) -> None:
        if self.stun is not None:
            await self.stun.stop()
            self.stun = None

    async def _listen(self) -> None:
        extra = {"stats": self._stats, "user.unlock": self._unlock}
        self.control = await control.open_control(self.host, extra)
        c2s = self.host.config.c2s
        hosts: Any = c2s.host
        self._servers.append(
            await asyncio.start_server(
                self._accept_plain, hosts, c2s.port, limit=1 << 20, backlog=LISTEN_BACKLOG
            )
        )
        if c2s.direct_tls:
            self._servers.append(
                await asyncio.start_server(
                    self._accept_tls,
                    hosts,
                    c2s.direct_tls_port,
                    ssl=self.host.ssl_context,
                    ssl_handshake_timeout=30,
                    limit=1 << 20,
                    backlog=LISTEN_BACKLOG,
                )
            )
        # The bound port, not the configured one: with port = 0 this is how a supervisor (or
        # a test running natterd as a process) learns where to connect.
        for srv, kind in zip(self._servers, ("c2s", "c2s direct TLS"), strict=False):
            for sock in srv.sockets:
                log.info("%s listening on %s", kind, host_port(sock.getsockname()))

    @property
    def c2s_port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def direct_tls_port(self) -> int | None:
        if len(self._servers) < 2:
            return None
        return int(self._servers[1].sockets[0].getsockname()[1])

    async def _accept_plain(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._serve(reader, writer, direct_tls=False)

    async def _accept_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, direct_tls=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, direct_tls: bool
    ) -> None:
        """The last resort around one connection: nothing escapes to asyncio, which would
        log "Unhandled exception in client_connected_cb" and leave the socket to the GC."""
        try:
            await self._serve_connection(reader, writer, direct_tls=direct_tls)
        except asyncio.CancelledError:
            # The loop is going away; asyncio's done-callback would choke on a cancelled task.
            log.debug("connection handler cancelled")
        except Exception:
            log.exception("connection handler failed")
        finally:
            if not writer.is_closing():
                writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, direct_tls: bool
    ) -> None:
        peer = writer.get_extra_info("peername")
        ip = network_of(peer[0]) if peer else "?"
        cap = self.host.config.c2s.max_connections_per_ip
        if cap and self._per_ip.get(ip, 0) >= cap:
            await self._refuse(writer, ip)
            return
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        conn = Connection(self.host, reader, writer, direct_tls=direct_tls)
        self._connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    async def _refuse(self, writer: asyncio.StreamWriter, ip: str) -> None:
        """One connection too many from ``ip``: a stream error (RFC 6120 §4.9.1.1 allows it
        before the client's header), then close. Nothing is read, nothing is kept."""
        now = time.monotonic()
        if now - self._refusal_logged > 10.0:  # one line per 10 s, not one per connection
            self._refusal_logged = now
            log.warning("refusing connections from %s: max_connections_per_ip reached", ip)
        writer.write(
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0' from='"
            + self.host.domain.encode()
            + b"'><stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too many connections from your"
            b" address</text></stream:error></stream:stream>"
        )
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        """Stop accepting, tell every client the server is going away, close storage."""
        if self.control is not None:
            await self.control.close()
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn.terminate(StreamError("system-shutdown"))
        # Each connection ends its session (unacknowledged messages go to offline storage)
        # before the database closes.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT)
        for srv in self._servers:
            await srv.wait_closed()
        # Sessions waiting for resumption end now: what they hold goes to offline storage.
        for conn in list(self.host.resumable.values()):
            if conn.detached:
                try:
                    await conn.end_session()
                except Exception:
                    log.exception("ending a detached session failed")
        while self.host.background:
            await asyncio.gather(*list(self.host.background), return_exceptions=True)
        await self._stop_components()
        await self._stop_http()
        for module in self.host.modules.values():
            await module.stop()
        await self._stop_stun()
        await self.host.storage.close()


def host_port(address: Any) -> str:
    """``127.0.0.1:5222`` or ``[::1]:5222`` from a socket address."""
    host, port = str(address[0]), int(address[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The young generation is collected every 50,000 allocations instead of CPython's 700:
# routing a message makes and drops a few dozen objects, and with thousands of sessions each
# collection walked many survivors. 76 -> 70-73 us of CPU per message (1,000 clients), and
# CPython's defaults ran 12 full collections (4.9 s) in a storm of 10,000 logins. The middle
# generation is collected every second time, so survivors of a login storm reach the old
# generation in small steps: with 20 there, one 0.74 s pause followed the storm.
GC_THRESHOLDS = (50_000, 2, 100)


def raise_descriptor_limit() -> None:
    """Every session is a socket: take all the descriptors the hard limit allows (a soft
    limit of 1,024 is still common), as Prosody and ejabberd do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tune_gc() -> None:
    """For natterd's own process (tests embed ``Server.start`` and keep the defaults): what
    startup made lives as long as the process, so the collector stops re-scanning it."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM (the ``natterd run`` entry point)."""
    raise_descriptor_limit()
    server = await Server.start(config)
    tune_gc()
    log.info("natterd serving %s", config.server.domain)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        log.info("shutting down")
        await server.stop()
