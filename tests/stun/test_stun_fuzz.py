"""Fuzzing: arbitrary bytes make the codec raise ValueError and nothing else, and the server
drop or answer them, in bounded time and memory."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from stun.framing import StreamFramer
from stun.message import ATTRIBUTES, COOKIE, parse_channel_data, parse_message
from tests.stun.fakes import NOW, TCP, UDP, make_server

# Hypothesis caches into ./.hypothesis; keep the working tree clean.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "natter-hypothesis")
FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Attribute type numbers we know, plus neighbours, so bodies reach the value parsers.
ATTRIBUTE_TYPES = st.sampled_from([a.type for a in ATTRIBUTES] + [0x0000, 0x7FFF, 0x8000, 0xFFFF])


@st.composite
def attribute(draw: st.DrawFn) -> bytes:
    value = draw(st.binary(max_size=40))
    declared = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFF)))
    return struct.pack("!HH", draw(ATTRIBUTE_TYPES), declared) + value + bytes(-len(value) % 4)


@st.composite
def stun_message(draw: st.DrawFn) -> bytes:
    """Mostly well-framed messages with random attributes, so the parser goes deep."""
    body = b"".join(draw(st.lists(attribute(), max_size=8)))
    message_type = draw(st.integers(0, 0x3FFF))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 0xFFFF)))
    transaction_id = draw(st.binary(min_size=12, max_size=12))
    cookie = draw(st.one_of(st.just(COOKIE), st.integers(0, 0xFFFFFFFF)))
    return struct.pack("!HHI", message_type, length, cookie) + transaction_id + body


def only_value_errors(parse: object, data: bytes) -> None:
    try:
        parse(data)  # type: ignore[operator]
    except ValueError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=200), stun_message()))
def test_parse_message_raises_only_value_error(data: bytes) -> None:
    only_value_errors(parse_message, data)
    try:
        message = parse_message(data, classic=True)
    except ValueError:
        return
    # What parses re-serialises and parses again to the same values.
    again = parse_message(bytes(message), classic=True)
    assert again.attributes == message.attributes


@FUZZ
@given(st.binary(max_size=100))
def test_parse_channel_data_raises_only_value_error(data: bytes) -> None:
    only_value_errors(parse_channel_data, b"\x40" + data)
    only_value_errors(parse_channel_data, data)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_framer_raises_only_value_error_and_holds_at_most_one_frame(chunks: list[bytes]) -> None:
    framer = StreamFramer()
    try:
        for chunk in chunks:
            for frame in framer.feed(chunk):
                assert len(frame) <= 20 + 0xFFFF
    except ValueError:
        return
    assert framer.buffered < 4 + 0xFFFF + 3


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=120), stun_message()), max_size=10))
def test_server_never_raises_and_answers_only_requests(packets: list[bytes]) -> None:
    server, network = make_server(rate=5, burst=5)
    for i, packet in enumerate(packets):
        server.receive(packet, TCP if i % 2 else UDP, NOW + i)
    for _, data, _ in network.sent:
        assert parse_message(data, classic=True).message_class.name in ("RESPONSE", "ERROR")
    assert len(network.sent) <= len(packets)
    assert network.relays == {}  # no credentials, so no allocation
