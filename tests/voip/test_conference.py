"""The conference mixer: mix-minus arithmetic on arrays (no I/O), the outgoing track, and one
conference leg over real aiortc on loopback that stops sending and is removed with every
socket and task."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from voip.conference import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    Conference,
    Mixer,
    MixTrack,
    Participant,
    limit,
    mix_minus,
)

DEADLINE = 30.0
FREQUENCIES = (300.0, 500.0, 700.0, 1100.0)


def tone(frequency: float, samples: int, amplitude: float = 0.3, start: int = 0) -> Any:
    t = (np.arange(samples) + start) / SAMPLE_RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)


def tone_levels(samples: npt.NDArray[Any], frequencies: Iterable[float]) -> dict[float, float]:
    """The spectral magnitude at each frequency (the strongest bin within ±10 Hz), relative
    to the strongest of them: 1.0 for the loudest tone, near 0 for one that is absent."""
    data = np.asarray(samples, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft((data - data.mean()) * np.hanning(len(data))))
    hz_per_bin = SAMPLE_RATE / len(data)
    levels = {}
    for f in frequencies:
        lo, hi = int((f - 10) / hz_per_bin), int((f + 10) / hz_per_bin) + 1
        levels[f] = float(spectrum[lo:hi].max())
    top = max(levels.values()) or 1.0
    return {f: level / top for f, level in levels.items()}


def frames(value: int, n: int = 4) -> Any:
    return np.full(n, value, dtype=np.int16)


# -- arithmetic ---------------------------------------------------------------------------


def test_each_participant_gets_the_sum_of_the_others() -> None:
    mixed = mix_minus({"a": frames(100), "b": frames(20), "c": frames(-3)})
    assert {k: v.tolist() for k, v in mixed.items()} == {
        "a": [17] * 4,
        "b": [97] * 4,
        "c": [120] * 4,
    }
    assert all(v.dtype == np.int16 for v in mixed.values())


def test_alone_a_participant_hears_silence() -> None:
    assert mix_minus({"a": frames(1000)})["a"].tolist() == [0] * 4
    assert mix_minus({}) == {}


def test_a_frame_over_full_scale_is_scaled_not_wrapped() -> None:
    loud = np.array([30000, 30000, -30000, 100], dtype=np.int16)
    mixed = mix_minus({"a": loud, "b": loud, "c": frames(0)})["c"]
    # 60000 would wrap to a negative int16; the frame is scaled so its peak is full scale.
    assert mixed.tolist() == [32767, 32767, -32767, 109]
    assert limit(np.array([-70000, 35000], dtype=np.int32)).tolist() == [-32767, 16384]
    quiet = np.array([5, -5], dtype=np.int32)
    assert limit(quiet).tolist() == [5, -5]  # under full scale: untouched


def test_mixer_takes_one_frame_per_tick_and_pads_what_is_missing() -> None:
    mixer: Mixer[str] = Mixer(frame_samples=4, max_buffered=16)
    mixer.add("a")
    mixer.add("b")
    mixer.push("a", np.arange(1, 7, dtype=np.int16))  # a frame and a half
    assert mixer.mix()["b"].tolist() == [1, 2, 3, 4]
    assert mixer.mix()["b"].tolist() == [5, 6, 0, 0]  # the rest, then silence
    assert mixer.mix()["b"].tolist() == [0, 0, 0, 0]
    assert mixer.mix()["a"].tolist() == [0, 0, 0, 0]  # b never sent anything


def test_mixer_keeps_the_newest_audio_when_a_buffer_overflows() -> None:
    mixer: Mixer[str] = Mixer(frame_samples=2, max_buffered=4)
    mixer.add("a")
    mixer.add("b")
    mixer.push("a", np.arange(1, 7, dtype=np.int16))
    assert mixer.buffered("a") == 4 and mixer.dropped["a"] == 2
    assert mixer.mix()["b"].tolist() == [3, 4]
    with pytest.raises(ValueError):
        Mixer(frame_samples=4, max_buffered=2)


def test_participants_join_and_leave_between_ticks() -> None:
    mixer: Mixer[str] = Mixer(frame_samples=2)
    mixer.add("a")
    mixer.push("a", frames(7, 2))
    mixer.push("ghost", frames(9, 2))  # not a participant: ignored
    assert set(mixer.mix()) == {"a"}
    mixer.add("b")
    mixer.push("a", frames(7, 2))
    mixer.push("b", frames(5, 2))
    assert {k: v.tolist() for k, v in mixer.mix().items()} == {"a": [5, 5], "b": [7, 7]}
    mixer.remove("a")
    mixer.push("a", frames(7, 2))
    assert {k: v.tolist() for k, v in mixer.mix().items()} == {"b": [0, 0]}
    assert "a" not in mixer and len(mixer) == 1 and mixer.participants == ["b"]


def test_four_tones_each_hears_the_three_others_and_not_its_own() -> None:
    mixer: Mixer[float] = Mixer()
    for f in FREQUENCIES:
        mixer.add(f)
    heard: dict[float, list[Any]] = {f: [] for f in FREQUENCIES}
    for n in range(50):  # one second
        for f in FREQUENCIES:
            mixer.push(f, tone(f, FRAME_SAMPLES, start=n * FRAME_SAMPLES))
        for f, out in mixer.mix().items():
            heard[f].append(out)
    for f in FREQUENCIES:
        levels = tone_levels(np.concatenate(heard[f]), FREQUENCIES)
        assert levels[f] < 0.01, levels
        assert all(levels[g] > 0.5 for g in FREQUENCIES if g != f), levels


# -- the outgoing track -------------------------------------------------------------------


async def test_mix_track_sends_20ms_frames_in_sequence_and_ends_when_stopped() -> None:
    track = MixTrack(max_queued=2)
    for value in (1, 2, 3):  # the oldest is dropped: the encoder gets the newest
        track.put(np.full(FRAME_SAMPLES, value, dtype=np.int16))
    first, second = await track.recv(), await track.recv()
    assert (first.sample_rate, first.samples, first.pts, second.pts) == (48000, 960, 0, 960)
    assert first.to_ndarray()[0, 0] == 2 and second.to_ndarray()[0, 0] == 3
    waiting = asyncio.create_task(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(MediaStreamError):
        await waiting


# -- one leg over aiortc ------------------------------------------------------------------


class SilentTrack(MediaStreamTrack):
    """An audio track that never produces a frame (a stalled client)."""

    kind = "audio"

    async def recv(self) -> Any:
        await asyncio.Event().wait()


async def test_a_leg_without_audio_is_removed_and_frees_everything() -> None:
    left: list[tuple[str, str]] = []

    async def on_leave(conference: Conference, participant: Participant, reason: str) -> None:
        left.append((participant.key, reason))

    conference = Conference("room@call.test", media_timeout=1.0, check_interval=0.1)
    conference.on_leave = on_leave
    client = RTCPeerConnection()
    try:
        client.addTrack(SilentTrack())
        await client.setLocalDescription(await client.createOffer())
        participant, answer = await conference.join("a@test/1", "s1", client.localDescription.sdp)
        assert "a=rtcp-mux" in answer and "opus/48000/2" in answer
        await client.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        sockets = participant.udp_sockets()
        assert len(sockets) == 1  # RTP and RTCP on one socket, IPv4 only
        async with asyncio.timeout(DEADLINE):
            await participant.left.wait()
            while conference.tasks:
                await asyncio.sleep(0.05)
        assert left == [("a@test/1", "timeout")] and participant.reason == "timeout"
        assert conference.empty and len(conference.mixer) == 0
        assert conference.ticks > 0  # it was mixing (silence) while the leg lived
        assert participant.pc.connectionState == "closed"
        assert all(s.fileno() == -1 for s in sockets)
        # The same participant may come back; leaving twice is harmless.
        assert await conference.leave("a@test/1") is None
    finally:
        await client.close()
        await conference.close()
