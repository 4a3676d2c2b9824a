"""One UDP port for every anchored leg, as Jitsi Videobridge does on its port 10000.

Without it every relay leg binds a socket of its own, and a firewall must open a whole port
range. With a :class:`SharedPort`, every leg's ICE host candidate is the same address and
port, and one socket carries STUN, DTLS, RTP and RTCP of all calls. Incoming datagrams are
told apart by

* the **ICE username fragment**: a STUN binding request from a client names the leg it is
  for in its USERNAME (``<leg's ufrag>:<client's ufrag>``, RFC 8445 §7.2.2); once its
  MESSAGE-INTEGRITY checks out with that leg's password, the request's source address
  belongs to the leg;
* the **source address**: every other datagram (DTLS, SRTP, STUN responses) goes to the leg
  that owns its source address, learnt from checks as above or from the leg's own sends
  (a leg's connectivity check to a client can precede the client's check to it).

Datagrams from unknown addresses that are not valid checks are dropped. The routing table
(:class:`Demux`) is sans-IO; :class:`SharedPort` is the asyncio socket around it, and
:meth:`SharedPort.attach` makes an aioice ``Connection`` gather its host candidate on the
shared socket instead of binding one (aioice has no such option, so the connection's
``get_component_candidates`` is replaced on that one instance; STUN/TURN candidates are not
needed on a server with a public address).

Ufrags are unique per port: :meth:`SharedPort.attach` draws a new one on a collision, before
the leg's description is made.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
from collections.abc import Callable
from typing import Any, cast

from aioice import stun
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol

log = logging.getLogger("natterd.relay")

Address = tuple[str, int]
MAX_ADDRESSES_PER_LEG = 16  # a client's candidates that checked in; more is an attack


def _ufrag_of(data: bytes) -> tuple[str, stun.Message] | None:
    """The local ufrag a STUN binding request names, with the parsed request."""
    if len(data) < 20 or data[0] > 3:  # RFC 7983: STUN starts with 0b000000xx
        return None
    try:
        message = stun.parse_message(data)
    except ValueError:
        return None
    if message.message_class != stun.Class.REQUEST:
        return None
    username = message.attributes.get("USERNAME")
    if not isinstance(username, str):
        return None
    return username.partition(":")[0], message


class Demux:
    """Which leg a datagram belongs to: by source address, else by a valid ICE check.

    ``L`` is whatever stands for a leg (the shell uses the aioice protocol); ``password``
    returns the leg's ICE password for the integrity check."""

    def __init__(self, password: Callable[[Any], str]) -> None:
        self._password = password
        self.by_ufrag: dict[str, Any] = {}
        self.by_address: dict[Address, Any] = {}
        self._addresses: dict[int, set[Address]] = {}  # id(leg) -> its learnt addresses

    def add(self, ufrag: str, leg: Any) -> None:
        if ufrag in self.by_ufrag:
            raise ValueError(f"ufrag {ufrag!r} is already in use on this port")
        self.by_ufrag[ufrag] = leg
        self._addresses[id(leg)] = set()

    def remove(self, leg: Any) -> None:
        for ufrag in [u for u, owner in self.by_ufrag.items() if owner is leg]:
            del self.by_ufrag[ufrag]
        for address in self._addresses.pop(id(leg), set()):
            if self.by_address.get(address) is leg:
                del self.by_address[address]

    def learn(self, address: Address, leg: Any) -> None:
        """``address`` talks to ``leg`` (the first leg to claim an address keeps it)."""
        owned = self._addresses.get(id(leg))
        if owned is None or address in self.by_address:
            return
        if len(owned) >= MAX_ADDRESSES_PER_LEG:
            return
        owned.add(address)
        self.by_address[address] = leg

    def route(self, data: bytes, address: Address) -> Any | None:
        """The leg for a datagram from ``address``; None drops it."""
        leg = self.by_address.get(address)
        if leg is not None:
            return leg
        found = _ufrag_of(data)
        if found is None:
            return None
        ufrag, message = found
        leg = self.by_ufrag.get(ufrag)
        if leg is None:
            return None
        if not message.check_message_integrity(self._password(leg).encode()):
            return None
        self.learn(address, leg)
        return leg


class _LegTransport(asyncio.DatagramTransport):
    """What one leg's aioice protocol sees as its socket: sends go out of the shared one."""

    def __init__(self, port: SharedPort, protocol: StunProtocol) -> None:
        super().__init__()
        self._port = port
        self._protocol = protocol
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing or addr is None:
            return
        self._port.send(self._protocol, bytes(data), (addr[0], addr[1]))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._port.address
        if name == "socket":
            return self._port.socket
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._port.detach(self._protocol)
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


class SharedPort(asyncio.DatagramProtocol):
    """The shared socket and its demultiplexer."""

    def __init__(self, public_address: str | None = None) -> None:
        self.demux = Demux(lambda protocol: protocol.receiver.local_password)
        self.transport: asyncio.DatagramTransport | None = None
        self.public_address = public_address
        self.dropped = 0  # datagrams no leg claimed

    @classmethod
    async def open(cls, host: str, port: int, public_address: str | None = None) -> SharedPort:
        loop = asyncio.get_running_loop()
        _, shared = await loop.create_datagram_endpoint(
            lambda: cls(public_address), local_addr=(host, port)
        )
        return shared

    @property
    def address(self) -> Address:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    @property
    def socket(self) -> Any:
        assert self.transport is not None
        return self.transport.get_extra_info("socket")

    @property
    def legs(self) -> int:
        return len(self.demux.by_ufrag)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        address = (addr[0], addr[1])
        protocol = self.demux.route(data, address)
        if protocol is None:
            self.dropped += 1
            return
        protocol.datagram_received(data, address)

    def error_received(self, exc: Exception) -> None:
        log.debug("shared relay port: %s", exc)

    # -- legs -------------------------------------------------------------------------

    def send(self, protocol: StunProtocol, data: bytes, address: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.demux.learn(address, protocol)
        self.transport.sendto(data, address)

    def detach(self, protocol: StunProtocol) -> None:
        self.demux.remove(protocol)

    def attach(self, connection: Connection) -> None:
        """Make ``connection`` (not yet gathered) use this port for its host candidate."""
        while connection.local_username in self.demux.by_ufrag:
            alphabet = string.ascii_letters + string.digits
            connection._local_username = "".join(secrets.choice(alphabet) for _ in range(8))

        async def component_candidates(
            component: int, addresses: list[str], timeout: int = 5
        ) -> list[Candidate]:
            protocol = StunProtocol(connection)
            transport = _LegTransport(self, protocol)
            # The advertised address: the public one, else the bound one, else (wildcard
            # bind) the first of the machine's addresses aioice found.
            bound = self.address[0]
            wildcard = bound in ("0.0.0.0", "::")
            host = self.public_address or (addresses[0] if wildcard and addresses else bound)
            if host in ("0.0.0.0", "::"):
                raise OSError("a shared relay port on a wildcard address needs an address")
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", host),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=host,
                port=self.address[1],
                type="host",
            )
            self.demux.add(connection.local_username, protocol)
            protocol.connection_made(transport)
            connection._protocols.append(protocol)
            return [protocol.local_candidate]

        connection.get_component_candidates = component_candidates  # type: ignore[method-assign]
