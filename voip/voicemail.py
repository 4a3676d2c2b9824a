"""Voicemail: the server answers a call nobody took and records the caller as Ogg/Opus.

Two parts:

* **A sans-IO Ogg Opus muxer** (:class:`OggOpusWriter`, RFC 3533 pages, RFC 7845 headers):
  the Opus payloads received over RTP go into Ogg pages as they are, without decoding or
  encoding, so a recording costs no codec CPU and keeps the caller's audio bit for bit. RTP
  timestamps place the packets: a gap (lost packets) is filled with one-byte Opus packets
  (a TOC byte and no frame, which decoders conceal as lost, RFC 6716 §3.2.1), so the
  recording keeps its timing. The writer stops taking packets at its length limit.
* **The answering side** (:class:`Voicemail`): once the signalling (``modules/jingle.py``)
  has sent the caller a ``<proceed/>`` from the callee's voicemail JID, the caller's Jingle
  session-initiate to that JID is taken here (an ``iq/full`` hook, like the relay's
  :class:`voip.relay.Anchor`), answered by one aiortc peer connection that only receives,
  and recorded until the caller hangs up, the length limit (then session-terminate from the
  voicemail JID), ``media_timeout`` seconds without audio, or a failed connection. Whatever
  ends it, the connection (its UDP socket, its tasks) is closed and ``on_end`` gets the
  session with its recording.

The Opus payloads are taken from aiortc's receiver before its decoder thread, by replacing
one private attribute (the receiver's decoder queue), as the relay's passthrough mode does;
it is pinned to the aiortc it was written for (1.16). A caller offering no Opus (G.711 only)
leaves no recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from voip.jingle import NS_ICE_UDP, NS_JINGLE, candidate_to_sdp, jingle_to_sdp, sdp_to_jingle
from voip.relay import ice_connections, swap_decoder_queue
from xmpp_server.errors import UnexpectedRequest
from xmpp_server.stanza import error_reply, iq_result, make, new_id, qn
from xmpp_server.xml import Element

log = logging.getLogger("natterd.voicemail")

NS_JINGLE_ERRORS = "urn:xmpp:jingle:errors:1"

# -- Ogg (RFC 3533) ----------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def ogg_crc(data: bytes) -> int:
    """The CRC-32 of an Ogg page: polynomial 0x04C11DB7, MSB first, initial value 0, no final
    XOR (RFC 3533 §6), computed with the page's checksum field set to zero."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


BOS, EOS = 0x02, 0x04  # header_type flags: first and last page of the stream
MAX_SEGMENTS = 255


def lacing(size: int) -> bytes:
    """The segment table entries of one packet of ``size`` bytes: 255s, then the rest (a
    final 0 when the size is a multiple of 255)."""
    return bytes([255] * (size // 255) + [size % 255])


def ogg_page(
    serial: int, sequence: int, granule: int, packets: Iterable[bytes], flags: int = 0
) -> bytes:
    """One page holding whole ``packets`` (none continued from or to another page)."""
    packets = list(packets)
    table = b"".join(lacing(len(p)) for p in packets)
    if len(table) > MAX_SEGMENTS:
        raise ValueError("Ogg page has more than 255 segments")
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(table))
    page = bytearray(header + table + b"".join(packets))
    struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
    return bytes(page)


# -- Opus (RFC 6716, RFC 7845) -----------------------------------------------------------

SAMPLE_RATE = 48000  # Opus RTP clock and Ogg Opus granule rate, whatever the audio bandwidth
PRE_SKIP = 3840
"""Samples a player drops at the start (80 ms). The recording may start mid-stream (the first
packets can be lost while DTLS comes up), and RFC 7845 §4.2 asks for 80 ms of pre-roll then."""


def opus_frame_samples(toc: int) -> int:
    """Samples (at 48 kHz) of one frame, from the configuration in a TOC byte (RFC 6716 §3.1)."""
    config = toc >> 3
    if config < 12:  # SILK-only: 10, 20, 40, 60 ms
        return (480, 960, 1920, 2880)[config % 4]
    if config < 16:  # hybrid: 10, 20 ms
        return (480, 960)[config % 2]
    return (120, 240, 480, 960)[config % 4]  # CELT-only: 2.5, 5, 10, 20 ms


def opus_packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) of an Opus packet; ValueError for a malformed one."""
    if not packet:
        raise ValueError("empty Opus packet")
    toc = packet[0]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise ValueError("Opus code 3 packet without a frame count")
        frames = packet[1] & 0x3F
        if frames == 0:
            raise ValueError("Opus packet with zero frames")
    samples = frames * opus_frame_samples(toc)
    if samples > 5760:
        raise ValueError("Opus packet longer than 120 ms")
    return samples


def opus_head(channels: int, pre_skip: int = PRE_SKIP) -> bytes:
    """The identification header (RFC 7845 §5.1), channel mapping family 0."""
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, SAMPLE_RATE, 0, 0)


def opus_tags(vendor: str, comments: Iterable[str] = ()) -> bytes:
    """The comment header (RFC 7845 §5.2)."""
    items = [c.encode() for c in comments]
    raw = vendor.encode()
    out = [b"OpusTags", struct.pack("<I", len(raw)), raw, struct.pack("<I", len(items))]
    for item in items:
        out += [struct.pack("<I", len(item)), item]
    return b"".join(out)


class OggOpusWriter:
    """Muxes Opus packets into an Ogg Opus stream, without I/O.

    :meth:`add` takes each packet with its RTP timestamp (48 kHz); :meth:`data_to_send`
    returns the pages completed so far, :meth:`finish` the rest (the last page marked end of
    stream). Packets past ``max_seconds`` of audio are refused."""

    def __init__(
        self,
        *,
        serial: int | None = None,
        max_seconds: float | None = None,
        pre_skip: int = PRE_SKIP,
        vendor: str = "natterd voicemail",
        comments: Iterable[str] = (),
        packets_per_page: int = 50,
    ) -> None:
        self.serial = secrets.randbits(32) if serial is None else serial
        self.pre_skip = pre_skip
        self.max_samples = None if max_seconds is None else round(max_seconds * SAMPLE_RATE)
        self.vendor = vendor
        self.comments = list(comments)
        self.packets_per_page = packets_per_page
        self.granule = 0  # samples of every packet written, pre-skip included
        self.packets = 0
        self.filled = 0  # packets made up to fill gaps
        self.full = False
        self._sequence = 0
        self._next_ts: int | None = None
        self._page: list[bytes] = []
        self._segments = 0
        self._out = bytearray()
        self._finished = False

    @property
    def seconds(self) -> float:
        """Playable length so far (what a player shows after pre-skip)."""
        return max(0, self.granule - self.pre_skip) / SAMPLE_RATE

    def add(self, packet: bytes, timestamp: int | None = None) -> bool:
        """Append one Opus packet; ``timestamp`` (RTP, 32-bit) places it after a gap or drops
        it when it is late or repeated. False when the packet was not taken."""
        if self._finished or self.full:
            return False
        try:
            samples = opus_packet_samples(packet)
        except ValueError:
            return False
        if len(packet) > 255 * (MAX_SEGMENTS - 1):
            return False
        if timestamp is not None:
            if self._next_ts is not None:
                gap = (timestamp - self._next_ts) & 0xFFFFFFFF
                if gap >= 1 << 31:
                    return False  # late or duplicate: its time is already written
                if gap:
                    self._fill(packet[0], gap)
                    if self.full:
                        return False
            self._next_ts = (timestamp + samples) & 0xFFFFFFFF
        return self._append(packet, samples)

    def _fill(self, toc: int, gap: int) -> None:
        """Lost packets: TOC-only packets (code 0) of the same configuration."""
        filler = bytes([toc & 0xFC])
        each = opus_frame_samples(toc)
        for _ in range(gap // each):
            if not self._append(filler, each):
                return
            self.filled += 1

    def _append(self, packet: bytes, samples: int) -> bool:
        if self.max_samples is not None and (
            self.granule + samples - self.pre_skip > self.max_samples
        ):
            self.full = True
            return False
        if self.packets == 0:
            channels = 2 if packet[0] & 0x04 else 1
            self._emit([opus_head(channels, self.pre_skip)], 0, BOS)
            self._emit([opus_tags(self.vendor, self.comments)], 0)
        segments = len(packet) // 255 + 1
        if self._page and (
            self._segments + segments > MAX_SEGMENTS or len(self._page) >= self.packets_per_page
        ):
            self._flush()
        self._page.append(packet)
        self._segments += segments
        self.granule += samples
        self.packets += 1
        return True

    def _flush(self, flags: int = 0) -> None:
        if self._page:
            self._emit(self._page, self.granule, flags)
            self._page, self._segments = [], 0

    def _emit(self, packets: list[bytes], granule: int, flags: int = 0) -> None:
        self._out += ogg_page(self.serial, self._sequence, granule, packets, flags)
        self._sequence += 1

    def data_to_send(self) -> bytes:
        """The pages completed since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def finish(self) -> bytes:
        """The remaining pages, the last one flagged end of stream; b"" when no packet was
        ever added (no stream at all)."""
        if not self._finished:
            self._finished = True
            self._flush(EOS)
        return self.data_to_send()


# -- the answering side ------------------------------------------------------------------


class _OpusTap:
    """Stands in for an ``RTCRtpReceiver``'s decoder queue: Opus payloads leaving the jitter
    buffer go to the writer; anything else still goes to the decoder thread."""

    def __init__(self, original: Any, session: VoicemailSession) -> None:
        self.original = original
        self.session = session

    def get(self) -> Any:  # the decoder thread waits here until the receiver stops
        return self.original.get()

    def put(self, item: Any) -> None:
        if item is None:
            self.original.put(None)
            return
        codec, encoded = item
        if codec.name.lower() != "opus":
            self.original.put(item)
            return
        if self.session.writer.add(bytes(encoded.data), encoded.timestamp):
            self.session.last_packet = time.monotonic()


def _tap(pc: RTCPeerConnection, track: MediaStreamTrack, session: VoicemailSession) -> bool:
    return swap_decoder_queue(pc, track, lambda queue: _OpusTap(queue, session))


def udp_sockets(pc: RTCPeerConnection) -> list[Any]:
    """The UDP sockets a peer connection's ICE transports hold (to check they are closed)."""
    sockets: list[Any] = []
    for connection in ice_connections(pc):
        for protocol in connection._protocols:
            udp = getattr(protocol, "transport", None)
            sock = udp.get_extra_info("socket") if udp is not None else None
            if sock is not None and all(sock is not s for s in sockets):
                sockets.append(sock)
    return sockets


@dataclass(eq=False)
class VoicemailSession:
    """One call taken by voicemail: ``caller`` (full JID) reached ``box`` (the callee's
    voicemail JID)."""

    sid: str
    caller: str
    box: str
    writer: OggOpusWriter
    context: Any = None  # whatever the signalling needs back in on_end
    pc: RTCPeerConnection | None = None
    started: float = field(default_factory=time.monotonic)
    last_packet: float | None = None
    reason: str | None = None
    """Why it ended: ``success`` (caller hung up or the length limit), ``timeout``…"""
    recording: bytes | None = None
    """The Ogg Opus file, once ended, if any audio arrived."""
    sockets: list[Any] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    initiated: bool = False
    setup_timer: asyncio.TimerHandle | None = None

    @property
    def seconds(self) -> float:
        return self.writer.seconds


EndHook = Callable[[VoicemailSession], Awaitable[None]]


class SocketBinder(Protocol):
    """Binds an aioice connection's sockets (the relay's ``HostSockets``: a port range, a
    public address), so voicemail legs obey the same firewall rules as relayed ones."""

    def install(self, connection: Any) -> None: ...


class Voicemail:
    """Answers and records the Jingle sessions callers start with a voicemail JID.

    The signalling announces each call with :meth:`expect` after sending the caller the
    ``<proceed/>``; :meth:`on_iq` is the router's ``iq/full`` hook and takes only the iqs of
    those sessions (and the answers to its own requests). ``on_end`` runs once per session,
    however it ended."""

    def __init__(
        self,
        router: Any,
        *,
        on_end: EndHook,
        max_seconds: float = 60.0,
        setup_timeout: float = 30.0,
        media_timeout: float = 10.0,
        request_timeout: float = 10.0,
        check_interval: float = 0.25,
        use_ipv6: bool = False,
        host_sockets: SocketBinder | None = None,
    ) -> None:
        self.router = router
        self.host_sockets = host_sockets
        self.on_end = on_end
        self.max_seconds = max_seconds
        self.setup_timeout = setup_timeout
        self.media_timeout = media_timeout
        self.request_timeout = request_timeout
        self.check_interval = check_interval
        self.use_ipv6 = use_ipv6
        self.sessions: dict[tuple[str, str], VoicemailSession] = {}  # (caller, sid)
        self.tasks: set[asyncio.Task[Any]] = set()

    def expect(self, sid: str, caller: str, box: str, context: Any = None) -> VoicemailSession:
        """``caller`` was told to start session ``sid`` with ``box``; it has
        ``setup_timeout`` seconds to do so."""
        old = self.sessions.get((caller, sid))
        if old is not None:
            return old
        writer = OggOpusWriter(max_seconds=self.max_seconds)
        session = VoicemailSession(sid, caller, box, writer, context)
        self.sessions[(caller, sid)] = session
        session.setup_timer = asyncio.get_running_loop().call_later(
            self.setup_timeout, self._spawn_finish, session, "timeout", False
        )
        return session

    def withdraw(self, caller: str, sid: str) -> None:
        """The caller gave up (JMI retract/finish) before or instead of a session-terminate."""
        session = self.sessions.get((caller, sid))
        if session is not None:
            self._spawn_finish(session, "success", False)

    async def close(self) -> None:
        """End every session (telling callers) and stop every task."""
        for session in list(self.sessions.values()):
            await self.finish(session, "gone", notify=True)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- the hook -------------------------------------------------------------------------

    async def on_iq(self, origin: Any, iq: Element, to: Any) -> bool:
        """``iq/full`` hook: True when the iq belonged to a voicemail session."""
        type_ = iq.get("type")
        if origin is None or type_ != "set":
            return False  # answers to our requests were taken by the router
        jingle = iq.find(qn(NS_JINGLE, "jingle"))
        if jingle is None:
            return False
        session = self.sessions.get((str(origin.jid), jingle.get("sid", "")))
        if session is None or str(to) != session.box:
            return False
        action = jingle.get("action", "")
        if action == "session-initiate" and session.initiated:
            origin.deliver(_error(iq, "out-of-order"))
            return True
        origin.deliver(iq_result(iq))
        if action == "session-initiate":
            session.initiated = True
            if session.setup_timer is not None:
                session.setup_timer.cancel()
            self._spawn(self._answer(session, jingle))
        elif action == "session-terminate":
            self._spawn_finish(session, "success", False)
        elif action == "transport-info":
            self._spawn(self._candidates(session, jingle))
        return True  # session-info and the rest: acknowledged

    # -- sessions -----------------------------------------------------------------------

    async def _answer(self, session: VoicemailSession, initiate: Element) -> None:
        if session.reason is not None:
            return  # ended before its task ran
        try:
            pc = session.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

            @pc.on("track")
            def _on_track(track: MediaStreamTrack) -> None:
                if track.kind == "audio" and not _tap(pc, track, session):
                    log.warning("voicemail %s: cannot take Opus packets from aiortc", session.sid)

            @pc.on("connectionstatechange")
            def _on_state() -> None:
                if pc.connectionState == "failed" and session.reason is None:
                    self._spawn_finish(session, "connectivity-error", True)

            offer = jingle_to_sdp(initiate, role="offer")
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            answer = await pc.createAnswer()
            for connection in ice_connections(pc):  # before gathering
                if not self.use_ipv6:
                    connection._use_ipv6 = False
                if self.host_sockets is not None:
                    self.host_sockets.install(connection)
            await pc.setLocalDescription(answer)
            session.sockets = udp_sockets(pc)
            accept = sdp_to_jingle(
                pc.localDescription.sdp,
                action="session-accept",
                sid=session.sid,
                initiator=initiate.get("initiator") or session.caller,
                responder=session.box,
            )
            await self._request(session.box, session.caller, accept)
            log.info("voicemail %s: recording %s for %s", session.sid, session.caller, session.box)
            await self._watch(session)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("voicemail %s from %s failed: %r", session.sid, session.caller, exc)
            await self.finish(session, "failed-application", notify=True)

    async def _watch(self, session: VoicemailSession) -> None:
        """End the session at the length limit or after ``media_timeout`` without audio."""
        while session.reason is None:
            await asyncio.sleep(self.check_interval)
            if session.writer.full:
                await self.finish(session, "success", notify=True)
            elif time.monotonic() - (session.last_packet or session.started) > self.media_timeout:
                await self.finish(session, "timeout", notify=True)

    async def _candidates(self, session: VoicemailSession, jingle: Element) -> None:
        if session.pc is None:
            return
        for content in jingle.iterfind(qn(NS_JINGLE, "content")):
            for el in content.iterfind(
                f"{qn(NS_ICE_UDP, 'transport')}/{qn(NS_ICE_UDP, 'candidate')}"
            ):
                try:
                    candidate = candidate_from_sdp(candidate_to_sdp(el).removeprefix("candidate:"))
                    candidate.sdpMid = content.get("name")
                    await session.pc.addIceCandidate(candidate)
                except Exception as exc:
                    log.debug("voicemail %s: candidate refused: %r", session.sid, exc)

    async def finish(self, session: VoicemailSession, reason: str, *, notify: bool) -> None:
        """End ``session`` once: session-terminate to the caller when ``notify``, the peer
        connection closed, the recording finished, then ``on_end``."""
        if session.reason is not None:
            await session.ended.wait()
            return
        session.reason = reason
        self.sessions.pop((session.caller, session.sid), None)
        if session.setup_timer is not None:
            session.setup_timer.cancel()
        if notify and session.initiated:
            # Not waiting for the answer: the session is over whatever the caller says.
            iq = make("iq", type="set", id=new_id(), from_=session.box, to=session.caller)
            iq.append(_terminate(session, reason))
            with contextlib.suppress(Exception):
                await self.router.deliver(iq)
        if session.pc is not None:
            with contextlib.suppress(Exception):
                await session.pc.close()
        data = session.writer.finish()
        session.recording = data if session.writer.seconds > 0 else None
        session.ended.set()
        log.info(
            "voicemail %s from %s ended (%s): %.1f s",
            session.sid,
            session.caller,
            reason,
            session.seconds,
        )
        try:
            await self.on_end(session)
        except Exception:
            log.exception("voicemail %s: could not deliver the recording", session.sid)

    def _spawn_finish(self, session: VoicemailSession, reason: str, notify: bool) -> None:
        self._spawn(self.finish(session, reason, notify=notify))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _request(self, sender: str, to: str, jingle: Element) -> Element:
        """An iq set from ``sender`` (the voicemail JID) to ``to``; its result."""
        reply: Element = await self.router.request_set(sender, to, jingle, self.request_timeout)
        return reply


def _terminate(session: VoicemailSession, reason: str) -> Element:
    jingle = Element(
        qn(NS_JINGLE, "jingle"),
        {"action": "session-terminate", "sid": session.sid, "initiator": session.caller},
    )
    reason_el = Element(qn(NS_JINGLE, "reason"))
    reason_el.append(Element(qn(NS_JINGLE, reason)))
    jingle.append(reason_el)
    return jingle


def _error(iq: Element, condition: str) -> Element:
    """A Jingle error answer (XEP-0166 §10): unexpected-request plus the Jingle condition."""
    extra = [Element(qn(NS_JINGLE_ERRORS, condition))]
    return error_reply(iq, UnexpectedRequest(type="cancel", extra=extra))
