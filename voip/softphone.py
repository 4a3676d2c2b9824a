"""A softphone over slixmpp and aiortc: places and answers one-to-one audio calls.

Signalling follows XEP-0353 (Jingle Message Initiation) then XEP-0166/0167
(Jingle RTP over ICE-UDP with DTLS-SRTP, mapped to SDP by :mod:`voip.jingle`):

    caller                         callee
    <propose/> (bare JID)  ──────▶
                          ◀──────  <proceed/> (caller's full JID)
    session-initiate iq    ──────▶           (offer, all candidates)
                          ◀──────  session-accept iq (answer)
    … media …
    session-terminate iq   ──────▶  (either side)

aiortc gathers every candidate before its description is ready, so both
descriptions carry complete candidate lists; candidates a peer trickles in
transport-info are added to the running connection. STUN/TURN servers come from
XEP-0215 (``urn:xmpp:extdisco:2``) when the server offers them.

It is used by ``natterctl call``/``answer`` and the tests: it sends a generated
tone or any aiortc audio track, and records what it hears to memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from av import AudioFrame
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from voip.jingle import (
    NS_ICE_UDP,
    NS_JINGLE,
    NS_RTP,
    candidate_to_sdp,
    jingle_to_sdp,
    sdp_to_jingle,
)
from xmpp_server.stanza import qn
from xmpp_server.xml import Element

logger = logging.getLogger(__name__)

NS_JMI = "urn:xmpp:jingle-message:0"
NS_EXTDISCO = "urn:xmpp:extdisco:2"
NS_HINTS = "urn:xmpp:hints"
NS_CLIENT = "jabber:client"

SAMPLE_RATE = 48000
_JMI_ACTIONS = ("propose", "proceed", "reject", "retract", "accept")
Samples = npt.NDArray[np.float64]


class XmppClient(Protocol):
    """The part of a logged-in ``slixmpp.ClientXMPP`` the softphone uses."""

    boundjid: Any

    def Iq(self) -> Any: ...

    def Message(self) -> Any: ...

    def register_handler(self, handler: Any) -> None: ...

    def remove_handler(self, name: str) -> Any: ...


# -- media -------------------------------------------------------------------------------


class ToneTrack(MediaStreamTrack):
    """A live audio track playing a sine tone: 20 ms frames of 48 kHz mono s16, paced in
    real time like a microphone."""

    kind = "audio"

    def __init__(self, frequency: float, *, amplitude: float = 0.3, ptime: float = 0.02) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self._samples = int(SAMPLE_RATE * ptime)
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += self._samples
            delay = self._start + self._pts / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        t = (np.arange(self._samples) + self._pts) / SAMPLE_RATE
        wave = self.amplitude * 32767 * np.sin(2 * np.pi * self.frequency * t)
        frame = AudioFrame.from_ndarray(
            wave.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


def frame_to_mono(frame: AudioFrame) -> Samples:
    """The samples of a decoded frame as mono floats in [-1, 1]."""
    data = frame.to_ndarray().astype(np.float64)
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mono = data.mean(axis=0)
    else:
        mono = data.reshape(-1, channels).mean(axis=1)
    scale = 32768.0 if frame.format.name.startswith("s16") else 1.0
    return np.asarray(mono / scale, dtype=np.float64)


def dominant_frequency(samples: Samples, sample_rate: int = SAMPLE_RATE) -> float:
    """The frequency (Hz) of the strongest spectral peak, refined between FFT bins."""
    if len(samples) < 16:
        raise ValueError("not enough samples")
    windowed = (samples - samples.mean()) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(windowed))
    peak = int(np.argmax(spectrum[1:])) + 1
    offset = 0.0
    if 0 < peak < len(spectrum) - 1:
        left, mid, right = np.log(spectrum[peak - 1 : peak + 2] + 1e-12)
        denominator = left - 2 * mid + right
        if denominator:
            offset = 0.5 * (left - right) / denominator
    return float((peak + offset) * sample_rate / len(samples))


class Recorder:
    """Reads a remote audio track into memory (mono 16-bit, 48 kHz) until stopped."""

    def __init__(self) -> None:
        self.chunks: list[npt.NDArray[np.int16]] = []
        self.sample_rate = SAMPLE_RATE
        self.received = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, track: MediaStreamTrack) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(track), name="softphone-recorder")

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                self.sample_rate = frame.sample_rate
                mono = np.clip(frame_to_mono(frame) * 32768, -32768, 32767)
                self.chunks.append(mono.astype(np.int16))
                self.received.set()

    @property
    def seconds(self) -> float:
        return sum(len(c) for c in self.chunks) / self.sample_rate

    def samples(self) -> Samples:
        """Everything heard so far, as floats in [-1, 1]."""
        if not self.chunks:
            return np.zeros(0)
        return np.concatenate(self.chunks).astype(np.float64) / 32768

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- calls -------------------------------------------------------------------------------


class CallError(Exception):
    """A call could not be set up (rejected, timed out, or refused by the peer)."""


@dataclass(eq=False)
class Call:
    """One Jingle RTP session and its peer connection."""

    sid: str
    peer: str
    """The peer's full JID once known (the bare JID while proposing)."""
    role: Literal["initiator", "responder"]
    initiator: str
    pc: RTCPeerConnection
    content: str = "0"
    recorder: Recorder = field(default_factory=Recorder)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    """Why the call ended (a XEP-0166 reason condition such as ``success``)."""
    proceeded: asyncio.Future[str] | None = None
    accepted: asyncio.Future[Element] | None = None

    def ice_pair(self) -> tuple[IceCandidate, IceCandidate] | None:
        """The (local, remote) candidates of the pair ICE selected, None before it did.
        aiortc does not report the selected pair, so this reads its aioice connection; a
        local server-reflexive candidate shows as its base, ``host`` (RFC 8445 §6.1.2.4)."""
        for transceiver in self.pc.getTransceivers():
            transport = transceiver.sender.transport
            if transport is None:
                continue
            connection = transport.transport.iceGatherer._connection
            pair = connection._nominated.get(1)
            if pair is not None:
                return _ice_candidate(pair.local_candidate), _ice_candidate(pair.remote_candidate)
        return None


@dataclass(frozen=True)
class IceCandidate:
    type: str
    """``host``, ``srflx``, ``prflx`` or ``relay``."""
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.type} {host}:{self.port}"


def _ice_candidate(candidate: Any) -> IceCandidate:
    return IceCandidate(str(candidate.type), str(candidate.host), int(candidate.port))


@dataclass
class IncomingCall:
    """A XEP-0353 proposal waiting to be answered."""

    sid: str
    caller: str
    media: list[str]
    withdrawn: str | None = None
    """``retract`` once the caller gave up, ``accept`` once another of our devices took it."""


class Softphone:
    """Places and answers calls for one logged-in slixmpp client.

    ``source`` makes the track sent on each call (default: a 440 Hz tone);
    ``ice_servers`` overrides the STUN/TURN servers discovered through XEP-0215.
    """

    def __init__(
        self,
        client: XmppClient,
        *,
        source: Callable[[], MediaStreamTrack] | None = None,
        ice_servers: list[RTCIceServer] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.source = source or (lambda: ToneTrack(440.0))
        self.ice_servers = ice_servers
        self.timeout = timeout
        self.calls: dict[str, Call] = {}
        self.incoming: asyncio.Queue[IncomingCall] = asyncio.Queue()
        self._offers: dict[str, tuple[str, asyncio.Future[Element]]] = {}
        self._proposals: dict[str, IncomingCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handler = f"natter-jingle-{id(self)}"
        client.register_handler(
            Callback(
                self._handler,
                MatchXPath(f"{{{NS_CLIENT}}}iq/{{{NS_JINGLE}}}jingle"),
                self._on_jingle_iq,
            )
        )
        # slixmpp's "message" event only fires for messages with a body; JMI has none.
        for action in _JMI_ACTIONS:
            client.register_handler(
                Callback(
                    f"{self._handler}-{action}",
                    MatchXPath(f"{{{NS_CLIENT}}}message/{{{NS_JMI}}}{action}"),
                    self._on_message,
                )
            )

    @property
    def jid(self) -> str:
        return str(self.client.boundjid.full)

    # -- public API ----------------------------------------------------------------------

    async def call(self, jid: str, *, media: str = "audio") -> Call:
        """Ring ``jid`` (bare: all its devices) and set the call up once one proceeds."""
        sid = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        call = await self._new_call(sid, jid, "initiator", self.jid)
        call.proceeded = loop.create_future()
        call.accepted = loop.create_future()
        try:
            self._send_jmi(
                jid, "propose", sid, Element(qn(NS_RTP, "description"), {"media": media})
            )
            async with asyncio.timeout(self.timeout):
                call.peer = await call.proceeded
            call.pc.addTrack(self.source())
            await call.pc.setLocalDescription(await call.pc.createOffer())
            initiate = sdp_to_jingle(
                call.pc.localDescription.sdp,
                action="session-initiate",
                sid=sid,
                initiator=self.jid,
            )
            call.content = _first_content(initiate)
            await self._send_jingle(call.peer, initiate)
            async with asyncio.timeout(self.timeout):
                accept = await call.accepted
            answer = jingle_to_sdp(accept, role="answer")
            await call.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        except BaseException as exc:
            proceeded = call.proceeded.done() and not call.proceeded.cancelled()
            if not proceeded:
                self._send_jmi(jid, "retract", sid)
            if call.ended.is_set():
                pass
            elif proceeded and call.proceeded.exception() is None:
                # The callee took the call: tell it the session is over.
                await self.hangup(call, "timeout" if isinstance(exc, TimeoutError) else "cancel")
            else:
                await self._end(call, "decline" if isinstance(exc, CallError) else "cancel")
            if isinstance(exc, TimeoutError):
                raise CallError(f"no answer from {jid}") from None
            raise
        return call

    async def answer(self, incoming: IncomingCall | None = None) -> Call:
        """Accept ``incoming`` (default: the next proposal) and set the call up."""
        if incoming is None:
            async with asyncio.timeout(self.timeout):
                incoming = await self.incoming.get()
                while incoming.withdrawn:
                    incoming = await self.incoming.get()
        sid = incoming.sid
        if incoming.withdrawn:
            raise CallError(f"call {sid} was withdrawn ({incoming.withdrawn})")
        self._proposals.pop(sid, None)
        await self._discover()  # before proceeding: the offer is answered without delay
        offer_future: asyncio.Future[Element] = asyncio.get_running_loop().create_future()
        self._offers[sid] = (incoming.caller, offer_future)
        own_bare = str(self.client.boundjid.bare)
        self._send_jmi(own_bare, "accept", sid)  # stops our other devices ringing
        self._send_jmi(incoming.caller, "proceed", sid)
        try:
            async with asyncio.timeout(self.timeout):
                initiate = await offer_future
        except TimeoutError:
            raise CallError(f"{incoming.caller} did not start the session") from None
        finally:
            self._offers.pop(sid, None)
        initiator = initiate.get("initiator", incoming.caller)
        call = await self._new_call(sid, incoming.caller, "responder", initiator)
        call.content = _first_content(initiate)
        try:
            offer = jingle_to_sdp(initiate, role="offer")
            await call.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            call.pc.addTrack(self.source())
            await call.pc.setLocalDescription(await call.pc.createAnswer())
            accept = sdp_to_jingle(
                call.pc.localDescription.sdp,
                action="session-accept",
                sid=sid,
                initiator=call.initiator,
                responder=self.jid,
            )
            await self._send_jingle(call.peer, accept)
        except BaseException:
            await self.hangup(call, "failed-application")
            raise
        return call

    def reject(self, incoming: IncomingCall) -> None:
        """Decline a proposal (XEP-0353 ``<reject/>``)."""
        self._proposals.pop(incoming.sid, None)
        self._send_jmi(incoming.caller, "reject", incoming.sid)

    async def hangup(self, call: Call, reason: str = "success") -> None:
        """End ``call``: session-terminate to the peer, then close the connection."""
        if call.ended.is_set():
            return
        terminate = Element(
            qn(NS_JINGLE, "jingle"),
            {"action": "session-terminate", "sid": call.sid, "initiator": call.initiator},
        )
        reason_el = Element(qn(NS_JINGLE, "reason"))
        reason_el.append(Element(qn(NS_JINGLE, reason)))
        terminate.append(reason_el)
        with contextlib.suppress(Exception):
            await self._send_jingle(call.peer, terminate, timeout=5)
        await self._end(call, reason)

    async def close(self) -> None:
        """Hang up every call and detach from the client."""
        for call in list(self.calls.values()):
            await self.hangup(call)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, future in self._offers.values():
            future.cancel()
        self._offers.clear()
        self.client.remove_handler(self._handler)
        for action in _JMI_ACTIONS:
            self.client.remove_handler(f"{self._handler}-{action}")

    # -- XEP-0215 ------------------------------------------------------------------------

    async def discover_ice_servers(self) -> list[RTCIceServer]:
        """STUN/TURN servers the XMPP server advertises (XEP-0215); [] if it offers none."""
        iq = self.client.Iq()
        iq["type"] = "get"
        iq["to"] = str(self.client.boundjid.domain)
        iq.xml.append(Element(qn(NS_EXTDISCO, "services")))
        try:
            reply = await iq.send(timeout=min(self.timeout, 10))
        except Exception as exc:  # service-unavailable, timeout: no servers, host candidates
            logger.debug("extdisco: %s", exc)
            return []
        return ice_servers_from_extdisco(reply.xml.find(qn(NS_EXTDISCO, "services")))

    async def _discover(self) -> list[RTCIceServer]:
        if self.ice_servers is None:
            self.ice_servers = await self.discover_ice_servers()
        return list(self.ice_servers)

    async def _new_call(
        self, sid: str, peer: str, role: Literal["initiator", "responder"], initiator: str
    ) -> Call:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=await self._discover()))
        call = Call(sid, peer, role, initiator, pc)

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                call.recorder.start(track)

        self.calls[sid] = call
        return call

    # -- signalling ----------------------------------------------------------------------

    def _send_jmi(self, to: str, action: str, sid: str, *children: Element) -> None:
        msg = self.client.Message()
        msg["to"] = to
        msg["type"] = "chat"
        el = Element(qn(NS_JMI, action), {"id": sid})
        el.extend(children)
        msg.xml.append(el)
        msg.xml.append(Element(qn(NS_HINTS, "store")))
        msg.send()

    async def _send_jingle(self, to: str, jingle: Element, timeout: float | None = None) -> None:
        iq = self.client.Iq()
        iq["type"] = "set"
        iq["to"] = to
        iq.xml.append(jingle)
        logger.debug("> %s %s", to, jingle.get("action"))
        await iq.send(timeout=timeout or self.timeout)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_message(self, msg: Any) -> None:
        sender = str(msg["from"])
        for el in msg.xml:
            if not el.tag.startswith(f"{{{NS_JMI}}}"):
                continue
            action, sid = el.tag.partition("}")[2], el.get("id", "")
            logger.debug("< %s jmi %s %s", sender, action, sid)
            call = self.calls.get(sid)
            if action == "propose":
                media = [d.get("media", "audio") for d in el.iterfind(qn(NS_RTP, "description"))]
                incoming = IncomingCall(sid, sender, media)
                self._proposals[sid] = incoming
                self.incoming.put_nowait(incoming)
                self._send_jmi(sender, "ringing", sid)
            elif action in ("retract", "accept") and sid in self._proposals:
                if action == "retract" or sender != self.jid:
                    self._proposals.pop(sid).withdrawn = action
            elif call is None or call.proceeded is None or call.proceeded.done():
                continue
            elif action == "proceed":
                call.proceeded.set_result(sender)
            elif action == "reject":
                call.proceeded.set_exception(CallError(f"{sender} rejected the call"))

    def _on_jingle_iq(self, iq: Any) -> None:
        jingle = iq.xml.find(qn(NS_JINGLE, "jingle"))
        action, sid = jingle.get("action", ""), jingle.get("sid", "")
        sender = str(iq["from"])
        logger.debug("< %s %s %s", sender, action, sid)
        call = self.calls.get(sid)
        expected = self._offers.get(sid)
        if action == "session-initiate" and expected is not None and expected[0] == sender:
            if not expected[1].done():
                expected[1].set_result(jingle)
        elif call is None or call.peer != sender:
            _error_reply(iq, "item-not-found")
            return
        elif action == "session-accept" and call.role == "initiator":
            if call.accepted is not None and not call.accepted.done():
                call.accepted.set_result(jingle)
        elif action == "session-terminate":
            self._spawn(self._end(call, _reason(jingle) or "success"))
        elif action == "transport-info":
            self._spawn(self._add_candidates(call, jingle))
        elif action != "session-info":  # XEP-0167 ringing/mute/hold: acknowledged, ignored
            _error_reply(iq, "feature-not-implemented")
            return
        iq.reply().send()

    async def _add_candidates(self, call: Call, jingle: Element) -> None:
        for content in jingle.iterfind(qn(NS_JINGLE, "content")):
            for el in content.iterfind(
                f"{qn(NS_ICE_UDP, 'transport')}/{qn(NS_ICE_UDP, 'candidate')}"
            ):
                candidate = candidate_from_sdp(candidate_to_sdp(el).removeprefix("candidate:"))
                candidate.sdpMid = content.get("name")
                await call.pc.addIceCandidate(candidate)

    async def _end(self, call: Call, reason: str) -> None:
        if call.reason is None:
            call.reason = reason
        self.calls.pop(call.sid, None)
        for future in (call.accepted, call.proceeded):
            if future is not None and not future.done():
                future.set_exception(CallError(f"session ended: {reason}"))
                future.exception()  # retrieved here: nobody may be waiting any more
        await call.recorder.stop()
        await call.pc.close()
        call.ended.set()

    async def wait_connected(self, call: Call) -> None:
        """Until the call's ICE and DTLS are connected and remote audio arrives."""

        state_changed = asyncio.Event()
        call.pc.on("connectionstatechange", state_changed.set)
        try:
            while call.pc.connectionState != "connected":
                if call.pc.connectionState in ("failed", "closed"):
                    raise CallError(f"connection {call.pc.connectionState}")
                state_changed.clear()
                await state_changed.wait()
        finally:
            call.pc.remove_listener("connectionstatechange", state_changed.set)
        await call.recorder.received.wait()


def _error_reply(iq: Any, condition: str) -> None:
    error = iq.reply()
    error["error"]["type"] = "cancel"
    error["error"]["condition"] = condition
    error.send()


def _reason(jingle: Element) -> str | None:
    """The condition of a XEP-0166 ``<reason>`` (``success``, ``decline``…)."""
    reason = jingle.find(qn(NS_JINGLE, "reason"))
    for child in reason if reason is not None else []:
        if child.tag != qn(NS_JINGLE, "text"):
            return child.tag.partition("}")[2]
    return None


def _first_content(jingle: Element) -> str:
    content = jingle.find(qn(NS_JINGLE, "content"))
    return content.get("name", "0") if content is not None else "0"


def ice_servers_from_extdisco(services: Element | None) -> list[RTCIceServer]:
    """aiortc ICE servers for the STUN and TURN entries of a XEP-0215 ``<services>``."""
    servers: list[RTCIceServer] = []
    for service in services.iterfind(qn(NS_EXTDISCO, "service")) if services is not None else []:
        kind, host, port = service.get("type"), service.get("host"), service.get("port")
        if not host or kind not in ("stun", "turn", "turns"):
            continue
        host = f"[{host}]" if ":" in host else host
        url = f"{kind}:{host}" + (f":{port}" if port else "")
        if kind == "stun":
            servers.append(RTCIceServer(urls=url))
            continue
        transport = service.get("transport", "udp")
        servers.append(
            RTCIceServer(
                urls=f"{url}?transport={transport}",
                username=service.get("username"),
                credential=service.get("password"),
            )
        )
    return servers
