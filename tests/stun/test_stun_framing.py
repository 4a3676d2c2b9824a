"""Cutting a TCP/TLS stream into STUN messages and padded ChannelData."""

from __future__ import annotations

import pytest

from stun.framing import StreamFramer
from stun.message import ChannelData, Class, Message, Method
from tests.helpers import feed_bytewise

STUN = bytes(Message(Method.BINDING, Class.REQUEST, attributes={"SOFTWARE": "abcde"}))
CHANNEL = ChannelData(0x4000, b"hello").padded()
EMPTY_CHANNEL = ChannelData(0x4001, b"").padded()


@pytest.mark.parametrize("bytewise", [False, True])
def test_frames_are_cut_whole_and_bytewise(bytewise: bool) -> None:
    stream = STUN + CHANNEL + EMPTY_CHANNEL + STUN
    framer = StreamFramer()
    frames = feed_bytewise(framer.feed, stream) if bytewise else framer.feed(stream)
    assert frames == [STUN, CHANNEL, EMPTY_CHANNEL, STUN]
    assert framer.buffered == 0


def test_incomplete_frame_is_held_back() -> None:
    framer = StreamFramer()
    assert framer.feed(STUN[:10]) == []  # aioice's fragmented-STUN case: split at byte 10
    assert framer.buffered == 10
    assert framer.feed(STUN[10:] + CHANNEL[:5]) == [STUN]
    assert framer.feed(CHANNEL[5:] + b"\x00") == [CHANNEL]
    assert framer.buffered == 1


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x80\x00\x00\x00", "stream data is neither STUN nor ChannelData"),
        (b"\xff\xff\xff\xff", "stream data is neither STUN nor ChannelData"),
        (b"PUT / HTTP/1.1\r\n", "ChannelData channel number is out of range"),
        (b"\x00\x01\x00\x05", "STUN message length is not a multiple of 4"),
    ],
)
def test_garbage_cannot_be_resynchronised(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        StreamFramer().feed(data)
    assert str(info.value) == error
