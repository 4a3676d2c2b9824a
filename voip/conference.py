"""Audio conferences: an aiortc leg per participant and a mix-minus mixer.

    alice ◀── leg ──▶ ┐
    bob   ◀── leg ──▶ ├─ [mixer: every 20 ms, each leg gets the sum of the *others*]
    carol ◀── leg ──▶ ┘

Each participant's leg is one ``RTCPeerConnection`` answering that participant's offer (RTP and
RTCP on one UDP socket, Opus at 48 kHz), like a leg of :mod:`voip.relay`. A reader task per leg
takes the decoded audio, converts it to 48 kHz mono 16-bit and pushes it into the
:class:`Mixer`; one clock task per conference ticks every 20 ms, takes one frame from every
participant's buffer (silence when it has none) and hands each participant's :class:`MixTrack`
the sum of the others, which that leg's sender encodes. The mixing itself (:class:`Mixer`,
:func:`mix_minus`, :func:`limit`) has no I/O and no clock, so it is tested with arrays.

A participant leaves by hanging up (:meth:`Conference.leave`), or is removed when its
connection fails or no audio arrived from it for ``media_timeout`` seconds (then ``on_leave``
tells the signalling). When the last participant leaves, the clock stops and the conference
holds no socket and no task; the signalling drops it.

Decoding and re-encoding every leg costs an Opus decode and encode per participant per frame
(aiortc cannot skip them, see :mod:`voip.relay`), so a conference of N costs about as much as
N relayed legs in ``transcode`` mode; the mixing is a few numpy additions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import av
import numpy as np
import numpy.typing as npt
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from voip import relay

log = logging.getLogger("natterd.conference")

SAMPLE_RATE = 48000
PTIME = 0.02
FRAME_SAMPLES = int(SAMPLE_RATE * PTIME)  # 960
FULL_SCALE = 32767
MAX_BUFFERED_FRAMES = 6
"""Input kept per participant (120 ms): a burst after a stall is played, a longer backlog
(a sender whose clock runs fast) loses its oldest audio instead of adding delay for ever."""
MAX_QUEUED_FRAMES = 5
"""Mixed frames waiting for a leg's encoder; a leg that is not sending yet keeps the newest."""

Samples = npt.NDArray[np.int16]
K = TypeVar("K", bound=Hashable)


# -- the mixing, without I/O -------------------------------------------------------------


def limit(mixed: npt.NDArray[np.int32]) -> Samples:
    """``mixed`` as 16-bit samples: a frame whose peak passes full scale is scaled down as a
    whole (no clipping distortion, which would add tones of its own); the rounding is then
    clipped so no sample wraps."""
    peak = int(np.max(np.abs(mixed))) if mixed.size else 0
    scaled: npt.NDArray[Any] = mixed
    if peak > FULL_SCALE:
        scaled = np.round(mixed * (FULL_SCALE / peak))
    return np.asarray(np.clip(scaled, -FULL_SCALE - 1, FULL_SCALE), dtype=np.int16)


def mix_minus(frames: Mapping[K, Samples]) -> dict[K, Samples]:
    """For each participant, the sum of everyone else's frame (equal lengths): what it should
    hear. Alone, a participant gets silence."""
    if not frames:
        return {}
    total = np.sum([f.astype(np.int32) for f in frames.values()], axis=0, dtype=np.int32)
    return {key: limit(total - frame.astype(np.int32)) for key, frame in frames.items()}


class Mixer(Generic[K]):
    """Per-participant input buffers and the mix-minus of one frame per :meth:`mix`.

    :meth:`push` takes decoded audio as it arrives (any length); :meth:`mix`, called once per
    frame period by the caller's clock, takes ``frame_samples`` from every buffer, padding
    with silence what a participant did not send in time."""

    def __init__(
        self,
        frame_samples: int = FRAME_SAMPLES,
        max_buffered: int = MAX_BUFFERED_FRAMES * FRAME_SAMPLES,
    ) -> None:
        if max_buffered < frame_samples:
            raise ValueError("the buffer must hold at least one frame")
        self.frame_samples = frame_samples
        self.max_buffered = max_buffered
        self._buffers: dict[K, Samples] = {}
        self.dropped: dict[K, int] = {}  # samples discarded because a buffer was full

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    @property
    def participants(self) -> list[K]:
        return list(self._buffers)

    def add(self, key: K) -> None:
        self._buffers.setdefault(key, np.zeros(0, dtype=np.int16))
        self.dropped.setdefault(key, 0)

    def remove(self, key: K) -> None:
        self._buffers.pop(key, None)
        self.dropped.pop(key, None)

    def buffered(self, key: K) -> int:
        return len(self._buffers[key])

    def push(self, key: K, samples: Samples) -> None:
        """Audio received from ``key`` (mono 16-bit at the mixer's rate); ignored once it left."""
        buffer = self._buffers.get(key)
        if buffer is None:
            return
        joined = np.concatenate([buffer, np.asarray(samples, dtype=np.int16).reshape(-1)])
        excess = len(joined) - self.max_buffered
        if excess > 0:
            self.dropped[key] += excess
            joined = joined[excess:]
        self._buffers[key] = joined

    def mix(self) -> dict[K, Samples]:
        """One frame for every participant: the others' audio, summed and limited."""
        n = self.frame_samples
        frames: dict[K, Samples] = {}
        for key, buffer in self._buffers.items():
            frame, self._buffers[key] = buffer[:n], buffer[n:]
            if len(frame) < n:
                frame = np.concatenate([frame, np.zeros(n - len(frame), dtype=np.int16)])
            frames[key] = frame
        return mix_minus(frames)


# -- the asyncio shell --------------------------------------------------------------------


class MixTrack(MediaStreamTrack):
    """A leg's outgoing audio: the mixed frames the conference's clock puts in, as 20 ms
    48 kHz mono frames with continuous timestamps. The clock paces it; the encoder waits."""

    kind = "audio"

    def __init__(self, max_queued: int = MAX_QUEUED_FRAMES) -> None:
        super().__init__()
        self._frames: deque[Samples] = deque(maxlen=max_queued)
        self._ready = asyncio.Event()
        self._pts = 0
        self.frames = 0  # frames handed to the encoder

    def put(self, samples: Samples) -> None:
        self._frames.append(samples)
        self._ready.set()

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake recv() so it ends

    async def recv(self) -> AudioFrame:
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        samples = self._frames.popleft()
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._pts += len(samples)
        self.frames += 1
        return frame


@dataclass(eq=False)
class Participant:
    """One participant's leg: ``key`` is its full JID, ``sid`` its Jingle session."""

    key: str
    sid: str
    pc: RTCPeerConnection
    track: MixTrack = field(default_factory=MixTrack)
    joined: float = field(default_factory=time.monotonic)
    last_audio: float | None = None
    frames_received: int = 0
    reason: str | None = None  # why it left, once it did
    left: asyncio.Event = field(default_factory=asyncio.Event)
    expiring: bool = False  # the conference is removing it by itself

    def ice_connections(self) -> list[Any]:
        """The aioice connections of this leg (one with BUNDLE)."""
        return relay.ice_connections(self.pc)

    def udp_sockets(self) -> list[Any]:
        """The UDP sockets this leg's ICE transports hold (closed ones report fileno -1)."""
        return relay.udp_sockets(self.pc)


LeaveHook = Callable[["Conference", Participant, str], Awaitable[None]]
"""(conference, participant, Jingle reason) when the conference removes a leg by itself."""


class Conference:
    """One audio conference: its participants' legs, the mixer and the clock.

    ``on_leave`` runs when the conference removes a participant by itself (its connection
    failed, its audio stopped for ``media_timeout`` seconds); :meth:`leave` does not run it."""

    def __init__(
        self,
        name: str,
        *,
        ice_servers: list[RTCIceServer] | None = None,
        media_timeout: float = 30.0,
        use_ipv6: bool = False,
        on_leave: LeaveHook | None = None,
        check_interval: float = 1.0,
    ) -> None:
        self.name = name
        self.ice_servers = ice_servers or []
        self.media_timeout = media_timeout
        self.use_ipv6 = use_ipv6
        self.on_leave = on_leave
        self.check_interval = check_interval
        self.participants: dict[str, Participant] = {}
        self.mixer: Mixer[str] = Mixer()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._clock: asyncio.Task[None] | None = None
        self.ticks = 0

    @property
    def empty(self) -> bool:
        return not self.participants

    async def join(self, key: str, sid: str, offer: str) -> tuple[Participant, str]:
        """Answer ``key``'s ``offer`` (SDP) with a new leg; returns it and the answer (SDP).
        A participant already in the conference under ``key`` is replaced."""
        old = self.participants.get(key)
        if old is not None:
            await self.leave(key, "expired")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))
        participant = Participant(key, sid, pc)
        # Registered before the first await: a conference that is joining is never empty.
        self.participants[key] = participant
        self.mixer.add(key)
        try:

            @pc.on("track")
            def _on_track(track: MediaStreamTrack) -> None:
                if track.kind == "audio":
                    self._spawn(self._read(participant, track))

            @pc.on("connectionstatechange")
            def _on_state() -> None:
                if pc.connectionState == "failed":
                    self._expire(participant, "connectivity-error")

            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            pc.addTrack(participant.track)
            answer = await pc.createAnswer()
            if not self.use_ipv6:
                for connection in participant.ice_connections():
                    connection._use_ipv6 = False
            await pc.setLocalDescription(answer)
        except BaseException:
            await self.leave(key, "failed-application")
            raise
        if self._clock is None or self._clock.done():
            self._clock = self._spawn(self._run_clock())
        log.info("%s joined conference %s (%d in it)", key, self.name, len(self.participants))
        return participant, str(pc.localDescription.sdp)

    async def add_candidate(self, key: str, candidate: Any) -> None:
        participant = self.participants.get(key)
        if participant is not None:
            await participant.pc.addIceCandidate(candidate)

    async def leave(
        self, key: str, reason: str = "success", *, sid: str | None = None
    ) -> Participant | None:
        """Remove ``key``'s leg (only if its session is ``sid``, when given): its track,
        reader and connection (socket) closed. The last one out stops the clock."""
        participant = self.participants.get(key)
        if participant is None or (sid is not None and participant.sid != sid):
            return None
        del self.participants[key]
        participant.reason = reason
        self.mixer.remove(key)
        participant.track.stop()
        with contextlib.suppress(Exception):
            await participant.pc.close()  # ends the remote track, so the reader stops too
        participant.left.set()
        if not self.participants and self._clock is not None:
            if self._clock is not asyncio.current_task():
                self._clock.cancel()
            self._clock = None
        log.info(
            "%s left conference %s (%s; %d received, %d sent)",
            key,
            self.name,
            reason,
            participant.frames_received,
            participant.track.frames,
        )
        return participant

    async def close(self, reason: str = "gone") -> list[Participant]:
        """Remove everyone and wait for every task of the conference to end."""
        gone = [p for key in list(self.participants) if (p := await self.leave(key, reason))]
        current = asyncio.current_task()
        pending = [task for task in self.tasks if task is not current]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return gone

    # -- tasks ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _read(self, participant: Participant, track: MediaStreamTrack) -> None:
        """Decoded audio from one leg into the mixer, as 48 kHz mono 16-bit."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        with contextlib.suppress(MediaStreamError):
            while participant.reason is None:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                for converted in resampler.resample(frame):
                    samples = np.asarray(converted.to_ndarray(), dtype=np.int16).reshape(-1)
                    self.mixer.push(participant.key, samples)
                participant.frames_received += 1
                participant.last_audio = time.monotonic()

    async def _run_clock(self) -> None:
        """Every 20 ms: one mixed frame to every leg. Paced on the monotonic clock from its
        start, so a late wake-up is made up by the next ticks; one that fell far behind (a
        starved CPU) starts counting again rather than bursting."""
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        next_check = start + self.check_interval
        while self.participants:
            n += 1
            due = start + n * PTIME
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -MAX_BUFFERED_FRAMES * PTIME:
                start, n = loop.time(), 0
            for key, samples in self.mixer.mix().items():
                participant = self.participants.get(key)
                if participant is not None:
                    participant.track.put(samples)
            self.ticks += 1
            if loop.time() >= next_check:
                next_check = loop.time() + self.check_interval
                self._check_media()

    def _check_media(self) -> None:
        now = time.monotonic()
        for participant in list(self.participants.values()):
            heard = participant.last_audio or participant.joined
            if now - heard > self.media_timeout:
                self._expire(participant, "timeout")

    def _expire(self, participant: Participant, reason: str) -> None:
        """Remove a leg the conference gave up on, then tell the signalling (once)."""
        if participant.expiring or self.participants.get(participant.key) is not participant:
            return
        participant.expiring = True  # a second trigger does nothing

        async def remove() -> None:
            if await self.leave(participant.key, reason, sid=participant.sid) is None:
                return  # it left meanwhile
            if self.on_leave is not None:
                try:
                    await self.on_leave(self, participant, reason)
                except Exception:
                    log.exception("could not signal the end of %s's leg", participant.key)

        self._spawn(remove())


def udp_sockets(participants: Iterable[Participant]) -> list[Any]:
    """Every UDP socket the legs of ``participants`` hold (or held)."""
    return [sock for p in participants for sock in p.udp_sockets()]
