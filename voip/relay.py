"""The media anchor: the server's side of relayed ("anchored") calls.

A relayed call has two *legs*, each an aiortc ``RTCPeerConnection``:

    caller ◀── leg A ──▶ [relay] ◀── leg B ──▶ callee

Leg A answers the caller's offer, leg B offers to the callee, and audio received on one leg
is sent on the other, so each client only ever exchanges packets with the server. Every leg
carries RTP and RTCP on one UDP socket (aiortc always negotiates ``rtcp-mux`` and uses a single
ICE component) and Opus, whose RTP clock is 48 kHz whatever the encoder's rate (RFC 7587):
a client encoding at 16 kHz (wideband) is forwarded untouched in passthrough, and decoded and
re-encoded at 48 kHz in transcoding (both tested).

Two ways of forwarding (``passthrough``):

* **transcoding** (default): aiortc hands received audio to tracks as decoded frames;
  :class:`ForwardTrack` re-sends leg A's frames as leg B's outgoing track, whose sender encodes
  them again (and computes their RFC 6465 audio level in pure Python, the biggest cost).
* **passthrough**: the encoded Opus payloads leave the receiver's jitter buffer into the other
  leg's track as ``av.Packet`` objects, which ``RTCRtpSender`` sends as they are (its public
  "pre-encoded data" path, ``Encoder.pack``): no decoding, no encoding. Taking the payloads
  needs one private aiortc attribute (the receiver's decoder queue, replaced by a
  :class:`_PacketTap`), so it is pinned to the aiortc it was written for (1.16); both legs
  must negotiate Opus (aiortc offers and prefers it; a G.711-only client needs transcoding).

Every call ends in :meth:`Relay.hangup` — on a session-terminate from either side, when no
audio arrived for ``media_timeout`` seconds, when a leg's connection fails, or when the relay
closes — which closes both legs (their sockets and tasks) and keeps a *call record*: who, how
long, why, and the RTCP statistics of each leg (packets, loss, jitter, round-trip time).

Ports and addresses: aioice (0.13) binds every host candidate socket to port 0 on every local
address and has no option for a port range or an advertised address. With ``port_range`` or
``public_address`` the relay binds each leg's sockets itself (:class:`HostSockets`, see there
for why this way), so a firewall needs only that range open, and a server behind 1:1 NAT
advertises its public address. With ``shared_port`` every leg of every call uses one UDP
socket instead (:mod:`voip.sharedport`, demultiplexed by ICE ufrag and source address): one
firewall rule for all calls. IPv6 host candidates are left out unless ``use_ipv6``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fractions
import functools
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import StunProtocol
from aioice.turn import UDP_SOCKET_BUFFER_SIZE
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from av.frame import Frame
from av.packet import Packet

from voip.jingle import NS_ICE_UDP, candidate_to_sdp, jingle_to_sdp, sdp_to_jingle
from voip.sharedport import SharedPort
from xmpp_server.stanza import iq_result
from xmpp_server.xml import Element

log = logging.getLogger("natterd.relay")

EndHook = Callable[["RelayCall", str], Awaitable[None]]
"""(the call, the Jingle reason) when the relay ends a call by itself (timeout, failure)."""


class ForwardTrack(MediaStreamTrack):
    """An outgoing audio track that re-sends the frames another leg receives. Its source is
    set once that leg's remote track exists; until then :meth:`recv` waits."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._source: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self.frames = 0
        self.last_frame: float | None = None
        self.packets: asyncio.Queue[Packet[Any] | None] | None = None  # passthrough

    def push(self, packet: Packet[Any] | None) -> None:
        """Passthrough: an encoded packet to send (None: the source ended)."""
        if self.packets is None:
            self.packets = asyncio.Queue()
        self.packets.put_nowait(packet)

    def set_source(self, track: MediaStreamTrack) -> None:
        if not self._source.done():
            self._source.set_result(track)

    async def recv(self) -> Frame | Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        source = await self._source
        frame: Frame | Packet[Any] | None
        if self.packets is not None:
            frame = await self.packets.get()
            if frame is None:
                raise MediaStreamError
        else:
            frame = await source.recv()
        self.frames += 1
        self.last_frame = time.monotonic()
        return frame

    def stop(self) -> None:
        super().stop()
        if not self._source.done():
            self._source.cancel()


class _PacketTap:
    """Stands in for an ``RTCRtpReceiver``'s decoder queue: Opus payloads coming out of the
    jitter buffer go to ``track`` as packets instead of to the decoder thread."""

    def __init__(self, original: Any, track: ForwardTrack) -> None:
        self.original = original
        self.track = track

    def get(self) -> Any:  # the decoder thread waits here until the receiver stops
        return self.original.get()

    def put(self, item: Any) -> None:
        if item is None:  # the receiver stops: end the decoder thread too
            self.original.put(None)
            self.track.push(None)
            return
        codec, encoded = item
        if codec.name.lower() != "opus":
            self.original.put(item)
            return
        packet = av.Packet(encoded.data)
        packet.pts = encoded.timestamp
        packet.time_base = fractions.Fraction(1, codec.clockRate)
        self.track.push(packet)


class _NoWaitBuffer:
    """Stands in for an audio receiver's jitter buffer: every packet goes on at once.

    aiortc's audio jitter buffer holds 4 packets before it hands one on (80 ms at 20 ms
    ptime) and always waits for the next packet to know a frame is complete; a relay is a hop,
    not a playout point, and the clients' own jitter buffers absorb the jitter. So the relay's
    legs forward each packet in order as it arrives and drop duplicates and late ones (their
    successors are already gone). Measured by ``bench.calls``: the relay's added one-way
    latency went from ~80 ms to ~0."""

    capacity = 16

    def __init__(self) -> None:
        self._last: int | None = None

    def add(self, packet: Any) -> tuple[bool, JitterFrame | None]:
        sequence = packet.sequence_number
        if self._last is not None:
            ahead = (sequence - self._last) & 0xFFFF
            if ahead == 0 or ahead >= 0x8000:  # a duplicate, or older than one already sent
                return False, None
        self._last = sequence
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def _receiver(pc: RTCPeerConnection, track: MediaStreamTrack) -> Any | None:
    """The ``RTCRtpReceiver`` of ``pc`` whose track is ``track``."""
    for transceiver in pc.getTransceivers():
        if transceiver.receiver.track is track:
            return transceiver.receiver
    return None


def _no_wait(pc: RTCPeerConnection, track: MediaStreamTrack) -> bool:
    """Replace the jitter buffer of the receiver of ``track`` by a :class:`_NoWaitBuffer`."""
    receiver = _receiver(pc, track)
    name = "_RTCRtpReceiver__jitter_buffer"
    if receiver is None or not hasattr(getattr(receiver, name, None), "add"):
        return False
    setattr(receiver, name, _NoWaitBuffer())
    return True


def swap_decoder_queue(
    pc: RTCPeerConnection, track: MediaStreamTrack, wrap: Callable[[Any], Any]
) -> bool:
    """Put ``wrap(queue)`` in place of the decoder queue of the receiver of ``track``: what
    leaves aiortc's jitter buffer then goes to the wrapper (one private aiortc 1.x name, so
    every tap of encoded audio goes through here)."""
    receiver = _receiver(pc, track)
    name = "_RTCRtpReceiver__decoder_queue"
    original = getattr(receiver, name, None) if receiver is not None else None
    if original is None or not hasattr(original, "put"):
        return False
    setattr(receiver, name, wrap(original))
    return True


def _tap(pc: RTCPeerConnection, track: MediaStreamTrack, out: ForwardTrack) -> bool:
    """Passthrough: take the encoded audio of ``track`` (received on ``pc``) for ``out``."""
    if not swap_decoder_queue(pc, track, lambda queue: _PacketTap(queue, out)):
        return False
    out.packets = asyncio.Queue()
    return True


def parse_port_range(text: str) -> tuple[int, int] | None:
    """``"min-max"`` (inclusive, both in 1024–65535) as a pair; ``""`` means any port."""
    if not text.strip():
        return None
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high)
    except ValueError:
        raise ValueError(f"port range {text!r} is not min-max") from None
    if not sep or not 1024 <= first <= last <= 65535:
        raise ValueError(f"port range {text!r} is not min-max within 1024-65535")
    return first, last


class HostSockets:
    """Binds a leg's host candidate sockets: each inside ``port_range``, and with
    ``public_address`` one socket per leg whose candidate carries that address.

    Why this way: aioice creates its sockets inside ``Connection.get_component_candidates``
    (``create_datagram_endpoint(local_addr=(address, 0))``, no option). Wrapping the event
    loop's ``create_datagram_endpoint`` during the relay's gathering would also catch every
    other socket made on the loop meanwhile (the STUN/TURN server, other legs gathering at the
    same time); so instead each leg's ``Connection`` gets :meth:`candidates` as its *own*
    ``get_component_candidates`` (an attribute of that one object, nothing global). aioice's
    gathering bookkeeping runs unchanged; only the sockets are ours, bound before aioice sees
    them. Host candidates only: a relay on a public (or 1:1 NATed) address needs no STUN or
    TURN for itself. Pinned, like :class:`_PacketTap`, to the aioice it was written for (0.13).

    1:1 NAT: the public address is bound directly when it is one of the machine's own
    addresses (the leg then holds exactly one socket even on a multi-homed server); otherwise
    the socket listens on the wildcard address and the NAT maps the public address to it.
    """

    def __init__(
        self, *, port_range: tuple[int, int] | None = None, public_address: str | None = None
    ) -> None:
        self.port_range = port_range
        self.public_address = public_address
        self._public_is_local: bool | None = None  # found out on the first bind

    def install(self, connection: Any) -> None:
        """Make ``connection`` (an aioice ``Connection`` not gathered yet) bind through us."""
        connection.get_component_candidates = functools.partial(self.candidates, connection)

    async def candidates(
        self, connection: Any, component: int, addresses: list[str], timeout: int = 5
    ) -> list[Candidate]:
        """What ``Connection.get_component_candidates`` returns: one host candidate per
        socket, the protocols registered with the connection (which closes them)."""
        binds: list[tuple[socket.socket, str]] = []
        try:
            if self.public_address is not None:
                binds.append((self._bind_public(), self.public_address))
            else:
                binds.extend((self._bind(address), address) for address in addresses)
        except OSError:
            for sock, _ in binds:
                sock.close()
            raise
        loop = asyncio.get_running_loop()
        candidates = []
        for sock, advertised in binds:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
            _, protocol = await loop.create_datagram_endpoint(
                lambda: StunProtocol(connection), sock=sock
            )
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", advertised),
                component=component,
                transport="udp",
                priority=candidate_priority(component, "host"),
                host=advertised,
                port=sock.getsockname()[1],
                type="host",
            )
            connection._protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        return candidates

    def _bind_public(self) -> socket.socket:
        assert self.public_address is not None
        wildcard = "::" if ipaddress.ip_address(self.public_address).version == 6 else "0.0.0.0"
        if self._public_is_local is not False:
            try:
                sock = self._bind(self.public_address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                self._public_is_local = False
            else:
                self._public_is_local = True
                return sock
        return self._bind(wildcard)

    def _bind(self, address: str) -> socket.socket:
        """A non-blocking UDP socket on ``address``, on a free port of the range (tried from
        a random one on, so that consecutive legs do not all probe the same ports)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        first, last = self.port_range or (0, 0)  # no range: port 0, any port
        start = random.randint(first, last)
        ports = [*range(start, last + 1), *range(first, start)]
        for port in ports:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            return sock
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {first}-{last} on {address}")


def ice_connections(pc: RTCPeerConnection) -> list[Any]:
    """The aioice connections of ``pc`` (one per transport; one with BUNDLE)."""
    found: list[Any] = []
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        if transport is None:
            continue
        connection = transport.transport.iceGatherer._connection
        if all(connection is not c for c in found):
            found.append(connection)
    return found


def udp_sockets(pc: RTCPeerConnection) -> list[Any]:
    """The UDP sockets the ICE transports of ``pc`` hold (closed ones report fileno -1)."""
    sockets = []
    for connection in ice_connections(pc):
        for protocol in connection._protocols:
            transport = getattr(protocol, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                sockets.append(sock)
    return sockets


@dataclass
class Leg:
    """One peer connection of a relayed call, towards ``party``."""

    name: str  # "caller" or "callee"
    party: str  # the client's full JID
    pc: RTCPeerConnection
    outgoing: ForwardTrack = field(default_factory=ForwardTrack)

    def ice_connections(self) -> list[Any]:
        """The aioice connections of this leg (one per transport; one with BUNDLE)."""
        return ice_connections(self.pc)

    def udp_sockets(self) -> list[Any]:
        """The UDP sockets this leg's ICE transports hold."""
        return udp_sockets(self.pc)

    async def stats(self) -> dict[str, Any]:
        """RTCP-derived statistics of the leg (what getStats reports)."""
        out: dict[str, Any] = {"party": self.party, "state": self.pc.connectionState}
        try:
            report = await self.pc.getStats()
        except Exception:  # closed transports
            return out
        for stat in report.values():
            kind = stat.type
            if kind == "inbound-rtp":
                out.update(
                    packets_received=stat.packetsReceived,
                    packets_lost=stat.packetsLost,
                    jitter=stat.jitter,
                )
            elif kind == "outbound-rtp":
                out.update(packets_sent=stat.packetsSent, bytes_sent=stat.bytesSent)
            elif kind == "remote-inbound-rtp":
                out.update(
                    remote_packets_lost=stat.packetsLost,
                    remote_jitter=stat.jitter,
                    fraction_lost=stat.fractionLost,
                    rtt=stat.roundTripTime,
                )
        return out


@dataclass
class RelayCall:
    """A call anchored in the relay."""

    sid: str
    caller: str  # full JIDs
    callee: str
    caller_leg: Leg
    callee_leg: Leg
    started: float = field(default_factory=time.time)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def legs(self) -> tuple[Leg, Leg]:
        return self.caller_leg, self.callee_leg

    def last_media(self) -> float | None:
        stamps = [leg.outgoing.last_frame for leg in self.legs if leg.outgoing.last_frame]
        return max(stamps) if stamps else None


class Relay:
    """Anchors calls: two legs per call, audio forwarded between them, cleanup of everything.

    ``on_end`` runs when the relay ends a call by itself (the signalling then tells both
    clients); calls ended by :meth:`hangup` do not run it."""

    def __init__(
        self,
        *,
        ice_servers: list[RTCIceServer] | None = None,
        media_timeout: float = 30.0,
        use_ipv6: bool = False,
        passthrough: bool = False,
        on_end: EndHook | None = None,
        check_interval: float = 1.0,
        port_range: tuple[int, int] | None = None,
        public_address: str | None = None,
        shared_port: int = 0,
    ) -> None:
        self.ice_servers = ice_servers or []
        self.shared_port = shared_port
        """One UDP port for every leg (:mod:`voip.sharedport`), 0 for a socket per leg."""
        self.shared: SharedPort | None = None
        self._shared_lock = asyncio.Lock()
        self.public_address = public_address
        self.host_sockets: HostSockets | None = None
        """Binds the legs' sockets when a port range or a public address is configured
        (otherwise aioice does: every local address, ephemeral ports)."""
        if port_range is not None or public_address is not None:
            self.host_sockets = HostSockets(port_range=port_range, public_address=public_address)
        self.passthrough = passthrough
        self.media_timeout = media_timeout
        self.use_ipv6 = use_ipv6
        self.on_end = on_end
        self.check_interval = check_interval
        self.calls: dict[str, RelayCall] = {}  # by sid
        self.records: list[dict[str, Any]] = []  # ended calls, the newest last (bounded)
        self.totals: dict[str, float] = dict.fromkeys(
            ("calls_ended", "packets_received", "packets_lost", "frames_forwarded"), 0
        )
        self.tasks: set[asyncio.Task[Any]] = set()

    def _leg(self, name: str, party: str) -> Leg:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
        return Leg(name, party, pc)

    def _restrict(self, leg: Leg) -> None:
        """Before the leg gathers: no IPv6 unless asked, our sockets when configured."""
        for connection in leg.ice_connections():
            if not self.use_ipv6:
                connection._use_ipv6 = False
            if self.shared is not None:
                self.shared.attach(connection)
            elif self.host_sockets is not None:
                self.host_sockets.install(connection)

    async def _open_shared_port(self) -> None:
        """Bind the shared port on first use: the public address when it is one of the
        machine's, else every address (the kernel then picks each reply's source)."""
        async with self._shared_lock:
            if not self.shared_port or self.shared is not None:
                return
            public = self.public_address
            try:
                self.shared = await SharedPort.open(public or "0.0.0.0", self.shared_port, public)
            except OSError as exc:
                if public is None or exc.errno != errno.EADDRNOTAVAIL:
                    raise
                self.shared = await SharedPort.open("0.0.0.0", self.shared_port, public)
            log.info("relay legs share UDP port %s", self.shared.address)

    async def open(self, sid: str, caller: str, callee: str, offer: str) -> tuple[RelayCall, str]:
        """Start anchoring: leg A takes the caller's ``offer`` (SDP); returns the call and the
        offer (SDP) of leg B for the callee."""
        if sid in self.calls:
            raise ValueError(f"call {sid} is already relayed")
        await self._open_shared_port()
        call = RelayCall(
            sid, caller, callee, self._leg("caller", caller), self._leg("callee", callee)
        )
        self.calls[sid] = call
        a, b = call.legs
        try:

            @a.pc.on("track")
            def _from_caller(track: MediaStreamTrack) -> None:
                if track.kind == "audio":
                    _no_wait(a.pc, track)
                    if self.passthrough:
                        _tap(a.pc, track, b.outgoing)
                    b.outgoing.set_source(track)

            @b.pc.on("track")
            def _from_callee(track: MediaStreamTrack) -> None:
                if track.kind == "audio":
                    _no_wait(b.pc, track)
                    if self.passthrough:
                        _tap(b.pc, track, a.outgoing)
                    a.outgoing.set_source(track)

            for leg in call.legs:
                leg.pc.on("connectionstatechange", self._state_watch(call, leg))
            await a.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            a.pc.addTrack(a.outgoing)
            b.pc.addTrack(b.outgoing)
            b_offer = await b.pc.createOffer()
            self._restrict(b)
            await b.pc.setLocalDescription(b_offer)
        except BaseException:
            await self.hangup(call, "failed-application")
            raise
        return call, str(b.pc.localDescription.sdp)

    async def accept(self, call: RelayCall, answer: str) -> str:
        """The callee answered leg B with ``answer`` (SDP): returns leg A's answer (SDP) for
        the caller."""
        a, b = call.legs
        try:
            await b.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            a_answer = await a.pc.createAnswer()
            self._restrict(a)
            await a.pc.setLocalDescription(a_answer)
        except BaseException:
            await self.hangup(call, "failed-application")
            raise
        self._spawn(self._watchdog(call))
        return str(a.pc.localDescription.sdp)

    async def add_candidate(self, call: RelayCall, party: str, candidate: Any) -> None:
        leg = call.caller_leg if party == call.caller else call.callee_leg
        await leg.pc.addIceCandidate(candidate)

    def leg_of(self, call: RelayCall, party: str) -> Leg | None:
        return next((leg for leg in call.legs if leg.party == party), None)

    async def hangup(self, call: RelayCall, reason: str = "success") -> dict[str, Any]:
        """End ``call``: statistics into its record, then every leg closed. Idempotent."""
        if call.reason is not None:
            await call.ended.wait()
            return call.record
        call.reason = reason
        self.calls.pop(call.sid, None)
        legs: dict[str, Any] = {}
        for leg in call.legs:
            legs[leg.name] = await leg.stats()
            legs[leg.name]["frames_forwarded"] = leg.outgoing.frames
        for leg in call.legs:
            leg.outgoing.stop()
            with contextlib.suppress(Exception):
                await leg.pc.close()
        call.record = {
            "sid": call.sid,
            "caller": call.caller,
            "callee": call.callee,
            "started": call.started,
            "duration": time.time() - call.started,
            "reason": reason,
            "legs": legs,
        }
        self.records.append(call.record)
        del self.records[:-100]
        self.totals["calls_ended"] += 1
        for stats in legs.values():
            for key in ("packets_received", "packets_lost", "frames_forwarded"):
                self.totals[key] += max(0, stats.get(key) or 0)
        call.ended.set()
        log.info("relayed call %s ended (%s): %s", call.sid, reason, legs)
        return call.record

    def metrics(self) -> dict[str, Any]:
        """Counters for ``natterctl stats``: calls now and ended, packets and losses of ended
        calls' legs (RTCP receiver statistics), and jitter and round-trip time averaged over
        the recent call records."""
        legs = [leg for record in self.records for leg in record["legs"].values()]
        jitters = [leg["jitter"] for leg in legs if leg.get("jitter") is not None]
        rtts = [leg["rtt"] for leg in legs if leg.get("rtt") is not None]
        return {
            "active_calls": len(self.calls),
            **{key: int(value) for key, value in self.totals.items()},
            "recent_mean_jitter": round(sum(jitters) / len(jitters), 6) if jitters else None,
            "recent_mean_rtt_ms": round(1000 * sum(rtts) / len(rtts), 2) if rtts else None,
            "shared_port_legs": self.shared.legs if self.shared is not None else None,
        }

    async def close(self) -> None:
        """End every call and stop every task."""
        for call in list(self.calls.values()):
            await self.hangup(call, "gone")
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    # -- timeouts ---------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _state_watch(self, call: RelayCall, leg: Leg) -> Callable[[], None]:
        def changed() -> None:
            if leg.pc.connectionState == "failed" and call.reason is None:
                self._spawn(self._end(call, "connectivity-error"))

        return changed

    async def _watchdog(self, call: RelayCall) -> None:
        """End the call when no audio was forwarded for ``media_timeout`` seconds."""
        started = time.monotonic()
        while call.reason is None:
            await asyncio.sleep(self.check_interval)
            last = call.last_media() or started
            if time.monotonic() - last > self.media_timeout and call.reason is None:
                await self._end(call, "timeout")

    async def _end(self, call: RelayCall, reason: str) -> None:
        if call.reason is not None:
            return
        await self.hangup(call, reason)
        if self.on_end is not None:
            try:
                await self.on_end(call, reason)
            except Exception:
                log.exception("could not signal the end of relayed call %s", call.sid)


# -- the signalling side: Jingle sessions anchored by the server -------------------------

NS_JINGLE = "urn:xmpp:jingle:1"
NS_DTLS = "urn:xmpp:jingle:apps:dtls:0"
NS_OMEMO_LEGACY = "eu.siacs.conversations.axolotl"
NS_OMEMO_2 = "urn:xmpp:omemo:2"


def end_to_end_protected(jingle: Any) -> str | None:
    """Why a session-initiate must not be anchored, or None: a DTLS fingerprint carried
    OMEMO-encrypted inside a transport (Conversations/Dino) is verified end to end, and a
    relay terminating DTLS would break that verification."""
    for content in jingle.iter(f"{{{NS_JINGLE}}}content"):
        for transport in content:
            if not transport.tag.endswith("}transport"):
                continue
            for ns in (NS_OMEMO_LEGACY, NS_OMEMO_2):
                if transport.find(f".//{{{ns}}}encrypted") is not None:
                    plain = transport.find(f"{{{NS_DTLS}}}fingerprint") is not None
                    what = "alongside a plain one" if plain else "instead of a plain one"
                    return f"OMEMO-encrypted DTLS fingerprint ({ns}) {what}"
    return None


class Anchor:
    """Anchors Jingle sessions in a :class:`Relay` (natterd's ``media = "relay"``).

    Registered as the router's ``iq/full`` hook. A caller's session-initiate to a callee's
    full JID is taken by the server: it answers the caller with leg A (session-accept *from
    the callee's JID*) and places leg B to the callee as a session-initiate *from the caller's
    JID*, with the same sid, so both clients see an ordinary call with each other and only
    ever talk to the server. session-terminate is forwarded both ways; transport-info feeds
    the right leg; other actions are acknowledged. A session with an OMEMO-protected
    fingerprint goes through untouched (logged)."""

    def __init__(
        self,
        router: Any,
        *,
        ring_timeout: float = 45.0,
        media_timeout: float = 30.0,
        request_timeout: float = 10.0,
        use_ipv6: bool = False,
        passthrough: bool = False,
        port_range: str = "",
        public_address: str = "",
        shared_port: int = 0,
    ) -> None:
        """``port_range`` (``"min-max"``) and ``public_address`` as configured; "" for none;
        ``shared_port``: one UDP port for every leg (0: a socket per leg).
        A malformed value raises ValueError (natterd then refuses to start)."""
        if public_address:
            ipaddress.ip_address(public_address)  # a ValueError naming the bad value
        self.router = router
        self.ring_timeout = ring_timeout
        self.request_timeout = request_timeout
        self.relay = Relay(
            media_timeout=media_timeout,
            use_ipv6=use_ipv6,
            passthrough=passthrough,
            port_range=parse_port_range(port_range),
            public_address=public_address or None,
            shared_port=shared_port,
            on_end=self._relay_ended,
        )
        self.sessions: dict[tuple[str, str, str], _Session] = {}  # (caller, callee, sid)
        self.tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await self._terminate(session, "gone", notify=(session.caller, session.callee))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.relay.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the hook -------------------------------------------------------------------------

    async def on_iq(self, origin: Any, iq: Any, to: Any) -> bool:
        """``iq/full`` hook: True when the iq was for the relay."""
        type_ = iq.get("type")
        if origin is None or type_ != "set":
            return False  # the server's own stanzas (ours included) and answers pass
        jingle = iq.find(f"{{{NS_JINGLE}}}jingle")
        if jingle is None:
            return False
        sender, target = str(origin.jid), str(to)
        action, sid = jingle.get("action", ""), jingle.get("sid", "")
        session = self.sessions.get((sender, target, sid)) or self.sessions.get(
            (target, sender, sid)
        )
        if session is None:
            if action != "session-initiate" or not sid:
                return False
            reason = end_to_end_protected(jingle)
            if reason is not None:
                log.info("call %s from %s to %s not anchored: %s", sid, sender, target, reason)
                return False
            if self.router.session(to) is None:
                return False  # the router answers service-unavailable
            session = _Session(sid, sender, target)
            self.sessions[(sender, target, sid)] = session
            origin.deliver(iq_result(iq))
            self._spawn(self._anchor(session, jingle))
            return True
        origin.deliver(iq_result(iq))
        if action == "session-accept" and sender == session.callee:
            if not session.accepted.done():
                session.accepted.set_result(jingle)
        elif action == "session-terminate":
            other = session.callee if sender == session.caller else session.caller
            self._spawn(self._terminate(session, _reason(jingle) or "success", notify=(other,)))
        elif action == "transport-info" and session.call is not None:
            self._spawn(self._candidates(session, sender, jingle))
        return True

    # -- sessions -----------------------------------------------------------------------

    async def _anchor(self, session: _Session, initiate: Any) -> None:
        caller, callee, sid = session.caller, session.callee, session.sid
        try:
            offer = jingle_to_sdp(initiate, role="offer")
            session.call, b_offer = await self.relay.open(sid, caller, callee, offer)
            b_initiate = sdp_to_jingle(
                b_offer, action="session-initiate", sid=sid, initiator=caller
            )
            await self._request(caller, callee, b_initiate)
            async with asyncio.timeout(self.ring_timeout):
                accept = await session.accepted
            a_answer = await self.relay.accept(session.call, jingle_to_sdp(accept, role="answer"))
            a_accept = sdp_to_jingle(
                a_answer, action="session-accept", sid=sid, initiator=caller, responder=callee
            )
            await self._request(callee, caller, a_accept)
            log.info("call %s from %s to %s anchored in the relay", sid, caller, callee)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not anchor call %s from %s to %s: %r", sid, caller, callee, exc)
            reason = "timeout" if isinstance(exc, TimeoutError) else "failed-application"
            await self._terminate(session, reason, notify=(caller, callee))

    async def _candidates(self, session: _Session, sender: str, jingle: Any) -> None:
        call = session.call
        if call is None:
            return
        for content in jingle.iterfind(f"{{{NS_JINGLE}}}content"):
            for el in content.iterfind(f"{{{NS_ICE_UDP}}}transport/{{{NS_ICE_UDP}}}candidate"):
                try:
                    candidate = candidate_from_sdp(candidate_to_sdp(el).removeprefix("candidate:"))
                    candidate.sdpMid = content.get("name")
                    await self.relay.add_candidate(call, sender, candidate)
                except Exception as exc:
                    log.debug("candidate refused on call %s: %r", session.sid, exc)

    async def _terminate(self, session: _Session, reason: str, notify: tuple[str, ...]) -> None:
        """End the session: the relay's legs closed, session-terminate sent to ``notify``."""
        if self.sessions.pop((session.caller, session.callee, session.sid), None) is None:
            return
        if not session.accepted.done():
            session.accepted.cancel()
        if session.call is not None:
            await self.relay.hangup(session.call, reason)
        for party in notify:
            other = session.callee if party == session.caller else session.caller
            with contextlib.suppress(Exception):
                await self._request(other, party, _terminate_element(session, reason))

    async def _relay_ended(self, call: RelayCall, reason: str) -> None:
        session = self.sessions.get((call.caller, call.callee, call.sid))
        if session is not None:
            await self._terminate(session, reason, notify=(call.caller, call.callee))

    async def _request(self, sender: str, to: str, jingle: Any) -> Any:
        """An iq set from ``sender``'s JID (on its behalf) to ``to``; its result."""
        return await self.router.request_set(sender, to, jingle, self.request_timeout)


@dataclass
class _Session:
    sid: str
    caller: str
    callee: str
    call: RelayCall | None = None
    accepted: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _reason(jingle: Any) -> str | None:
    reason = jingle.find(f"{{{NS_JINGLE}}}reason")
    for child in reason if reason is not None else []:
        if child.tag != f"{{{NS_JINGLE}}}text":
            return str(child.tag.partition("}")[2])
    return None


def _terminate_element(session: _Session, reason: str) -> Any:
    jingle = Element(
        f"{{{NS_JINGLE}}}jingle",
        {"action": "session-terminate", "sid": session.sid, "initiator": session.caller},
    )
    reason_el = Element(f"{{{NS_JINGLE}}}reason")
    reason_el.append(Element(f"{{{NS_JINGLE}}}{reason}"))
    jingle.append(reason_el)
    return jingle
