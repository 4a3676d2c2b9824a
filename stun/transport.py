"""The asyncio shell around ``StunServer``: listening sockets, client streams, relay sockets.

Everything here only moves bytes between sockets and the sans-IO core, and it implements
``stun.network.Network`` for the core's answers. No protocol decisions are made here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

from stun.framing import StreamFramer
from stun.network import Address, Endpoint, Transport
from stun.server import StunServer

log = logging.getLogger("natterd.stun")

READ_SIZE = 65536
IDLE_TIMEOUT = 300.0  # a TCP/TLS client without an allocation is closed after this long
MAX_BUFFER = 1 << 20  # bytes queued towards one TCP/TLS client before dropping
RELAY_BATCH = 64  # datagrams read from one relay socket before yielding to the loop
RELAY_RCVBUF = 1 << 18
# Listening sockets carry every client's requests and media towards relays: read them in
# batches like relay sockets, with a deeper kernel buffer. One datagram per loop turn (asyncio's
# datagram transport) overflowed the default buffer at 20,000 packets/s (bench/stun.py).
LISTEN_BATCH = 64
LISTEN_RCVBUF = 1 << 20

# Linux values; the socket module does not export them.
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_DO = 10, 23, 2


def _address(sockaddr: Any) -> Address:
    """IPv6 socket addresses are 4-tuples; the protocol only knows host and port."""
    return str(sockaddr[0]), int(sockaddr[1])


def udp_socket(address: Address, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``; IPv6 sockets stay IPv6-only so that
    "0.0.0.0" and "::" can both be bound on one port. ``reuse_port``: for listeners shared
    by worker processes (never for relays, which belong to one allocation)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _deepen_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUF is capped by net.core.rmem_max (208 KiB by default); with CAP_NET_ADMIN,
    SO_RCVBUFFORCE is not. Raise rmem_max on busy relays that run without it."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as exc:
        log.debug("SO_RCVBUF %d: %s", size, exc)


class SocketNetwork:
    """Implements ``Network`` with real sockets and feeds the core what they receive."""

    def __init__(
        self,
        core_factory: Callable[[SocketNetwork], StunServer],
        clock: Callable[[], float],
        reuse_port: bool = False,
    ) -> None:
        self.clock = clock
        self.reuse_port = reuse_port  # listeners shared with worker processes
        self.core = core_factory(self)
        self._loop = asyncio.get_running_loop()
        self._udp: dict[Address, socket.socket] = {}
        self._streams: dict[Endpoint, asyncio.StreamWriter] = {}
        self._servers: list[asyncio.Server] = []
        self._relays: dict[Address, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -----------------------------------------------------------------------------------------
    # Listening

    async def listen_udp(self, address: Address) -> Address:
        sock = udp_socket(address, self.reuse_port)
        _deepen_receive_buffer(sock, LISTEN_RCVBUF)
        bound = _address(sock.getsockname())
        self._udp[bound] = sock
        self._loop.add_reader(sock.fileno(), self._listener_readable, bound, sock)
        return bound

    def _listener_readable(self, bound: Address, sock: socket.socket) -> None:
        for _ in range(LISTEN_BATCH):
            try:
                data, addr = sock.recvfrom(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error for an earlier answer: nothing to do, and no reason to stop.
                log.debug("udp %s: %s", bound, exc)
                return
            self.core.receive(data, Endpoint("udp", _address(addr), bound), self.clock())

    async def listen_stream(
        self, hosts: list[str], port: int, context: ssl.SSLContext | None
    ) -> list[Address]:
        transport: Transport = "tls" if context is not None else "tcp"

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_stream(reader, writer, transport)

        server = await asyncio.start_server(
            accept,
            hosts,
            port,
            ssl=context,
            ssl_handshake_timeout=30 if context else None,
            reuse_port=self.reuse_port or None,
        )
        self._servers.append(server)
        return [_address(sock.getsockname()) for sock in server.sockets]

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: Transport
    ) -> None:
        endpoint = Endpoint(
            transport,
            _address(writer.get_extra_info("peername")),
            _address(writer.get_extra_info("sockname")),
        )
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._streams[endpoint] = writer
        framer = StreamFramer()
        core = self.core
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                except TimeoutError:
                    if core.turn is not None and core.turn.has_allocation(endpoint):
                        continue
                    break
                if not data:
                    break
                try:
                    frames = framer.feed(data)
                except ValueError as exc:
                    log.debug("x %s/%s:%d closed: %s", transport, *endpoint.client, exc)
                    break
                for frame in frames:
                    core.receive(frame, endpoint, self.clock())
        except (OSError, asyncio.IncompleteReadError):
            pass  # reset by the peer, TLS errors (ssl.SSLError is an OSError)
        finally:
            del self._streams[endpoint]
            core.connection_lost(endpoint)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    # -----------------------------------------------------------------------------------------
    # Network

    def send(self, endpoint: Endpoint, data: bytes, source: Address | None = None) -> None:
        # Whatever cannot be sent soon is dropped, as it could be on the wire: a client that
        # does not read (or a flood of answers) must not grow our buffers without bound.
        if endpoint.transport == "udp":
            sock = self._udp.get(source or endpoint.server) or self._udp.get(endpoint.server)
            if sock is not None:
                try:
                    sock.sendto(data, endpoint.client)
                except OSError as exc:  # a full send buffer or an unreachable client: lost
                    log.debug("udp %s -> %s: %s", endpoint.server, endpoint.client, exc)
            return
        writer = self._streams.get(endpoint)
        if writer is None or writer.transport.is_closing():
            return
        if writer.transport.get_write_buffer_size() <= MAX_BUFFER:
            writer.write(data)

    def open_relay(self, address: Address, dont_fragment: bool) -> bool:
        try:
            sock = udp_socket(address)
        except OSError:
            return False
        try:
            _deepen_receive_buffer(sock, RELAY_RCVBUF)
            if dont_fragment and sys.platform == "linux":
                if sock.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_DO)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_DO)
        except OSError as exc:
            log.debug("relay %s: socket option failed: %s", address, exc)
        self._relays[address] = sock
        self._loop.add_reader(sock.fileno(), self._relay_readable, address, sock)
        return True

    def close_relay(self, address: Address) -> None:
        sock = self._relays.pop(address, None)
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def send_from_relay(self, relay: Address, peer: Address, data: bytes) -> None:
        sock = self._relays.get(relay)
        if sock is None:
            return
        try:
            sock.sendto(data, peer)
        except OSError as exc:
            # Unreachable peer, full buffer: the datagram is lost, the allocation stays.
            log.debug("relay %s -> %s: %s", relay, peer, exc)

    def _relay_readable(self, address: Address, sock: socket.socket) -> None:
        for _ in range(RELAY_BATCH):
            try:
                data, peer = sock.recvfrom(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("relay %s: %s", address, exc)
                return
            self.core.receive_from_peer(address, data, _address(peer), self.clock())
            if address not in self._relays:
                return  # the core closed this relay meanwhile

    # -----------------------------------------------------------------------------------------

    @property
    def udp_addresses(self) -> list[Address]:
        return list(self._udp)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._streams.values()):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for server in self._servers:
            await server.wait_closed()
        for sock in self._udp.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        if self.core.turn is not None:
            self.core.turn.close()
        for address in list(self._relays):
            self.close_relay(address)
