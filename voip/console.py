"""``natterctl call`` and ``natterctl answer``: one call from the command line.

Logs an account in with slixmpp, places or answers one call with
:class:`voip.softphone.Softphone`, sends a tone or an audio file, optionally
records what it hears to a WAV file, and reports what it heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slixmpp
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack

from voip.softphone import (
    Call,
    CallError,
    IceCandidate,
    Recorder,
    Softphone,
    ToneTrack,
    dominant_frequency,
)


@dataclass(frozen=True)
class PhoneOptions:
    """Who logs in where, and what the call sends and records."""

    account: str
    password: str
    host: str
    port: int
    cafile: Path | None = None
    """Trust this certificate (natterd's self-signed one); None: the system's CAs."""
    tone: float | None = 440.0
    play: Path | None = None
    """Send this audio file instead of a tone (anything FFmpeg reads)."""
    record: Path | None = None
    """Write what is heard here (48 kHz mono 16-bit WAV)."""
    duration: float | None = 10.0
    """Hang up after this many connected seconds; None: wait for the peer to hang up."""
    timeout: float = 30.0


@dataclass(frozen=True)
class CallReport:
    peer: str
    seconds_heard: float
    frequency: float | None
    """Dominant frequency of what was heard (Hz), None if nothing was."""
    reason: str | None
    ice: tuple[IceCandidate, IceCandidate] | None = None
    """The (local, remote) candidates of the pair ICE selected: how the media went."""
    rtcp_rtt: float | None = None
    """Round-trip time (s) from RTCP reports, None if none came back (or we did not hang
    up: it is read just before our hang-up)."""


def write_wav(path: Path, recorder: Recorder) -> None:
    samples = np.concatenate(recorder.chunks) if recorder.chunks else np.zeros(0, np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(recorder.sample_rate)
        out.writeframes(samples.astype("<i2").tobytes())


def _source(options: PhoneOptions) -> Callable[[], MediaStreamTrack]:
    if options.play is not None:
        path = str(options.play)

        def player() -> MediaStreamTrack:
            track = MediaPlayer(path).audio
            if track is None:
                raise CallError(f"{path} has no audio")
            return track

        return player
    frequency = options.tone if options.tone is not None else 440.0
    return lambda: ToneTrack(frequency)


@contextlib.asynccontextmanager
async def _logged_in(options: PhoneOptions) -> AsyncIterator[Softphone]:
    client = slixmpp.ClientXMPP(options.account, options.password)
    client.enable_plaintext = False
    client.ssl_context = ssl.create_default_context(
        cafile=str(options.cafile) if options.cafile else None
    )
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_failure(_: object) -> None:
        if not failed.done():
            failed.set_result("authentication failed")

    client.add_event_handler("failed_all_auth", on_failure)
    client.connect(options.host, options.port)
    try:
        session = asyncio.ensure_future(client.wait_until("session_start", options.timeout))
        done, _ = await asyncio.wait({session, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            session.cancel()
            raise CallError(f"{options.account}: {failed.result()}")
        try:
            session.result()
        except TimeoutError:
            raise CallError(f"cannot log in to {options.host}:{options.port}") from None
        client.send_presence()
        phone = Softphone(client, source=_source(options), timeout=options.timeout)
        try:
            yield phone
        finally:
            await phone.close()
    finally:
        client.disconnect()
        with contextlib.suppress(Exception):
            await client.wait_until("disconnected", 5)


async def _rtcp_rtt(call: Call) -> float | None:
    """The round-trip time RTCP measured (our sender report, the peer's receiver report
    about it), None when no report came back."""
    with contextlib.suppress(Exception):
        report = await call.pc.getStats()
        for stat in report.values():
            if stat.type == "remote-inbound-rtp":
                return float(stat.roundTripTime)
    return None


async def _talk(phone: Softphone, call: Call, options: PhoneOptions) -> CallReport:
    async with asyncio.timeout(options.timeout):
        await phone.wait_connected(call)
    ice = call.ice_pair()
    rtt: float | None = None

    async def watch_rtcp() -> None:  # until the call ends: its stats go with the connection
        nonlocal rtt
        while True:
            rtt = await _rtcp_rtt(call) or rtt
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch_rtcp())
    try:
        if options.duration is None:
            await call.ended.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.ended.wait(), options.duration)
            watcher.cancel()
            await phone.hangup(call)
    finally:
        watcher.cancel()
    recorder = call.recorder
    if options.record is not None:
        write_wav(options.record, recorder)
    heard = recorder.samples()
    frequency = dominant_frequency(heard, recorder.sample_rate) if len(heard) >= 4800 else None
    return CallReport(call.peer, recorder.seconds, frequency, call.reason, ice, rtt)


async def place_call(peer: str, options: PhoneOptions) -> CallReport:
    """Call ``peer`` and talk for ``options.duration`` seconds."""
    async with _logged_in(options) as phone:
        call = await phone.call(peer)
        return await _talk(phone, call, options)


async def answer_call(options: PhoneOptions) -> CallReport:
    """Wait for one call, answer it, and talk until ``duration`` or the peer hangs up."""
    async with _logged_in(options) as phone:
        call = await phone.answer()
        return await _talk(phone, call, options)
