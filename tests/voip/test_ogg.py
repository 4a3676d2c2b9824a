"""The voicemail's Ogg Opus muxer (voip/voicemail.py): pages, CRC, headers and timing checked
against RFC 3533/6716/7845, libogg's pages as FFmpeg writes them, and FFmpeg's decoder."""

from __future__ import annotations

import fractions
import io
import struct

import av
import numpy as np
import pytest

from voip.softphone import SAMPLE_RATE, Samples, dominant_frequency, frame_to_mono
from voip.voicemail import (
    BOS,
    EOS,
    PRE_SKIP,
    OggOpusWriter,
    lacing,
    ogg_crc,
    ogg_page,
    opus_packet_samples,
)


def opus_packets(frequency: float, seconds: float) -> list[tuple[bytes, int]]:
    """A tone encoded by libopus in 20 ms packets, with the RTP timestamps they would carry."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = 32000
    out: list[tuple[bytes, int]] = []
    for index in range(int(seconds * 50)):
        t = (np.arange(960) + index * 960) / SAMPLE_RATE
        wave = (0.3 * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * 960
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        for packet in encoder.encode(frame):
            out.append((bytes(packet), index * 960))
    return out


def decode_ogg(data: bytes) -> tuple[Samples, int]:
    """Decode an Ogg Opus file with FFmpeg: mono samples in [-1, 1] and their rate."""
    chunks: list[Samples] = []
    rate = SAMPLE_RATE
    with av.open(io.BytesIO(data), format="ogg") as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name in ("opus", "libopus")
        for frame in container.decode(stream):
            assert isinstance(frame, av.AudioFrame)
            rate = frame.sample_rate
            chunks.append(frame_to_mono(frame))
    return (np.concatenate(chunks) if chunks else np.zeros(0)), rate


def pages(data: bytes) -> list[dict[str, object]]:
    """Split an Ogg stream into pages (each checked to start where the last ended)."""
    out: list[dict[str, object]] = []
    offset = 0
    while offset < len(data):
        magic, version, flags, granule, serial, seq, crc, count = struct.unpack_from(
            "<4sBBqIIIB", data, offset
        )
        assert (magic, version) == (b"OggS", 0)
        table = data[offset + 27 : offset + 27 + count]
        body_start = offset + 27 + count
        end = body_start + sum(table)
        raw = bytearray(data[offset:end])
        raw[22:26] = b"\0\0\0\0"
        packets, start, size = [], body_start, 0
        for value in table:
            size += value
            if value < 255:
                packets.append(data[start : start + size])
                start, size = start + size, 0
        out.append(
            {
                "flags": flags,
                "granule": granule,
                "serial": serial,
                "sequence": seq,
                "crc_ok": ogg_crc(bytes(raw)) == crc,
                "packets": packets,
            }
        )
        offset = end
    return out


def test_crc_is_crc32_with_polynomial_04c11db7_no_reflection_zero_init() -> None:
    # CRC-32/CKSUM (same polynomial and direction, init 0) checks "123456789" as 0x765E7680
    # after its final inversion; Ogg does not invert.
    assert ogg_crc(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF
    assert ogg_crc(b"") == 0


def test_crc_matches_the_pages_ffmpeg_writes() -> None:
    out = io.BytesIO()
    with av.open(out, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=SAMPLE_RATE)
        for index in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 960), dtype=np.int16), format="s16", layout="mono"
            )
            frame.sample_rate = SAMPLE_RATE
            frame.pts = index * 960
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    found = pages(out.getvalue())
    assert len(found) >= 3
    assert all(page["crc_ok"] for page in found)


def test_lacing_values() -> None:
    assert lacing(0) == b"\x00"
    assert lacing(100) == b"\x64"
    assert lacing(255) == b"\xff\x00"
    assert lacing(300) == b"\xff\x2d"


def test_a_page_holds_at_most_255_segments() -> None:
    ogg_page(1, 0, 0, [b"x"] * 255)
    with pytest.raises(ValueError, match="more than 255 segments"):
        ogg_page(1, 0, 0, [b"x"] * 256)


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([16 << 3]), 120),  # CELT 2.5 ms, one frame
        (bytes([(19 << 3) | 1]), 1920),  # CELT 20 ms, two equal frames
        (bytes([(1 << 3) | 2, 1]), 1920),  # SILK NB 20 ms, two frames of different sizes
        (bytes([(3 << 3) | 3, 2]), 5760),  # SILK NB 60 ms, code 3 with two frames: 120 ms
        (bytes([(13 << 3) | 0]), 960),  # hybrid SWB 20 ms
        (bytes([(31 << 3) | 3, 0x83]), 2880),  # CELT 20 ms, code 3 (VBR flag) with 3 frames
    ],
)
def test_opus_packet_durations_from_the_toc_byte(packet: bytes, samples: int) -> None:
    assert opus_packet_samples(packet) == samples


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (b"", "empty Opus packet"),
        (bytes([3]), "without a frame count"),
        (bytes([3, 0]), "zero frames"),
        (bytes([(3 << 3) | 3, 3]), "longer than 120 ms"),
    ],
)
def test_malformed_opus_packets_are_refused(packet: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        opus_packet_samples(packet)
    assert OggOpusWriter(serial=1).add(packet, 0) is False


def test_headers_pages_and_granules() -> None:
    writer = OggOpusWriter(serial=0x1234, comments=["TITLE=voicemail"], packets_per_page=10)
    packets = opus_packets(440.0, 1.0)
    for payload, timestamp in packets:
        assert writer.add(payload, timestamp)
    data = writer.data_to_send() + writer.finish()
    found = pages(data)
    assert all(page["crc_ok"] for page in found)
    assert [page["sequence"] for page in found] == list(range(len(found)))
    assert {page["serial"] for page in found} == {0x1234}
    head, tags, *audio = found
    assert head["flags"] == BOS and head["granule"] == 0
    (opus_head,) = head["packets"]  # type: ignore[misc]
    assert opus_head == struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, PRE_SKIP, 48000, 0, 0)
    (opus_tags,) = tags["packets"]  # type: ignore[misc]
    assert opus_tags.startswith(b"OpusTags") and opus_tags.endswith(b"TITLE=voicemail")
    assert all(page["flags"] == 0 for page in audio[:-1]) and audio[-1]["flags"] == EOS
    assert [len(page["packets"]) for page in audio] == [10] * 5  # type: ignore[arg-type]
    assert [page["granule"] for page in audio] == [9600 * (i + 1) for i in range(5)]
    assert writer.granule == 48000 and writer.seconds == pytest.approx(1 - PRE_SKIP / 48000)
    assert writer.finish() == b""  # finished once


def test_recording_decodes_to_the_tone_and_keeps_its_timing_across_losses() -> None:
    packets = opus_packets(440.0, 3.0)
    writer = OggOpusWriter()
    taken = 0
    for index, (payload, timestamp) in enumerate(packets):
        if 50 <= index < 55:
            continue  # 100 ms lost
        taken += writer.add(payload, timestamp)
        if index == 80:
            assert writer.add(payload, timestamp) is False  # repeated
            assert writer.add(*packets[70]) is False  # late
    assert (taken, writer.filled) == (len(packets) - 5, 5)
    assert writer.granule == 3 * 48000
    samples, rate = decode_ogg(writer.finish())
    assert rate == 48000
    assert len(samples) == pytest.approx(3 * 48000 - PRE_SKIP, abs=960)
    assert dominant_frequency(samples[:48000], rate) == pytest.approx(440.0, abs=5)
    assert dominant_frequency(samples[60000:], rate) == pytest.approx(440.0, abs=5)


def test_the_writer_stops_at_its_limit() -> None:
    writer = OggOpusWriter(max_seconds=1.0)
    results = [writer.add(payload, ts) for payload, ts in opus_packets(440.0, 2.0)]
    assert writer.full
    assert results.count(True) == (48000 + PRE_SKIP) // 960
    assert not any(results[results.index(False) :])
    assert 1.0 - 0.02 < writer.seconds <= 1.0
    samples, _ = decode_ogg(writer.finish())
    assert len(samples) / 48000 == pytest.approx(writer.seconds, abs=0.021)


def test_a_gap_past_the_limit_fills_up_to_it_only() -> None:
    writer = OggOpusWriter(max_seconds=0.5)
    first, second = opus_packets(440.0, 0.04)
    assert writer.add(first[0], 0)
    assert writer.add(second[0], 10 * 48000) is False  # ten seconds later
    assert writer.full and writer.seconds <= 0.5


def test_nothing_added_means_no_stream() -> None:
    assert OggOpusWriter().finish() == b""
