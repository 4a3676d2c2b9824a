"""The STUN codec: RFC 5769 and RFC 8489 test vectors, round trips, and every parse error."""

from __future__ import annotations

import struct

import pytest

from stun.message import (
    ATTRIBUTES_BY_NAME,
    CHANNEL_MIN,
    PASSWORD_SHA256,
    ChannelData,
    Class,
    Message,
    Method,
    long_term_key,
    message_integrity,
    parse_channel_data,
    parse_message,
    short_term_key,
    userhash,
)


def vector(annotated: str) -> bytes:
    """Hex as the RFCs print it: one 4-byte row per line, comments after '#'."""
    return bytes.fromhex("".join(line.split("#")[0] for line in annotated.splitlines()))


# RFC 5769 section 2.1: padding is 0x20 (not zero) to check that receivers ignore it.
SAMPLE_REQUEST = vector("""
    00 01 00 58   # Request type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # }
    bc 34 d6 86   # }  Transaction ID
    fa 87 df ae   # }
    80 22 00 10   # SOFTWARE attribute header
    53 54 55 4e   # }
    20 74 65 73   # }  User-agent...
    74 20 63 6c   # }  ...name
    69 65 6e 74   # }
    00 24 00 04   # PRIORITY attribute header
    6e 00 01 ff   # ICE priority value
    80 29 00 08   # ICE-CONTROLLED attribute header
    93 2f f9 b1   # }  Pseudo-random tie breaker...
    51 26 3b 36   # }   ...for ICE control
    00 06 00 09   # USERNAME attribute header
    65 76 74 6a   # }
    3a 68 36 76   # }  Username (9 bytes) and padding (3 bytes)
    59 20 20 20   # }
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    9a ea a7 0c   # }
    bf d8 cb 56   # }
    78 1e f2 b5   # }  HMAC-SHA1 fingerprint
    b2 d3 f2 49   # }
    c1 b5 71 a2   # }
    80 28 00 04   # FINGERPRINT attribute header
    e5 7a 3b cf   # CRC32 fingerprint
""")
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# RFC 5769 section 2.2
SAMPLE_IPV4_RESPONSE = vector("""
    01 01 00 3c   # Response type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # }
    bc 34 d6 86   # }  Transaction ID
    fa 87 df ae   # }
    80 22 00 0b   # SOFTWARE attribute header
    74 65 73 74   # }
    20 76 65 63   # }  UTF-8 server name
    74 6f 72 20   # }
    00 20 00 08   # XOR-MAPPED-ADDRESS attribute header
    00 01 a1 47   # Address family (IPv4) and xor'd mapped port number
    e1 12 a6 43   # Xor'd mapped IPv4 address
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    2b 91 f5 99   # }
    fd 9e 90 c3   # }
    8c 74 89 f9   # }  HMAC-SHA1 fingerprint
    2a f9 ba 53   # }
    f0 6b e7 d7   # }
    80 28 00 04   # FINGERPRINT attribute header
    c0 7d 4c 96   # CRC32 fingerprint
""")

# RFC 5769 section 2.3
SAMPLE_IPV6_RESPONSE = vector("""
    01 01 00 48   # Response type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # }
    bc 34 d6 86   # }  Transaction ID
    fa 87 df ae   # }
    80 22 00 0b   # SOFTWARE attribute header
    74 65 73 74   # }
    20 76 65 63   # }  UTF-8 server name
    74 6f 72 20   # }
    00 20 00 14   # XOR-MAPPED-ADDRESS attribute header
    00 02 a1 47   # Address family (IPv6) and xor'd mapped port number
    01 13 a9 fa   # }
    a5 d3 f1 79   # }  Xor'd mapped IPv6 address
    bc 25 f4 b5   # }
    be d2 b9 d9   # }
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    a3 82 95 4e   # }
    4b e6 7b f1   # }
    17 84 c9 7c   # }  HMAC-SHA1 fingerprint
    82 92 c2 75   # }
    bf e3 ed 41   # }
    80 28 00 04   # FINGERPRINT attribute header
    c8 fb 0b 4c   # CRC32 fingerprint
""")

# RFC 5769 section 2.4: username "マトリックス", password "TheMatrIX" after SASLprep.
SAMPLE_LONG_TERM_REQUEST = vector("""
    00 01 00 60   # Request type and message length
    21 12 a4 42   # Magic cookie
    78 ad 34 33   # }
    c6 ad 72 c0   # }  Transaction ID
    29 da 41 2e   # }
    00 06 00 12   # USERNAME attribute header
    e3 83 9e e3   # }
    83 88 e3 83   # }
    aa e3 83 83   # }  Username value (18 bytes) and padding (2 bytes)
    e3 82 af e3   # }
    82 b9 00 00   # }
    00 15 00 1c   # NONCE attribute header
    66 2f 2f 34   # }
    39 39 6b 39   # }
    35 34 64 36   # }
    4f 4c 33 34   # }  Nonce value
    6f 4c 39 46   # }
    53 54 76 79   # }
    36 34 73 41   # }
    00 14 00 0b   # REALM attribute header
    65 78 61 6d   # }
    70 6c 65 2e   # }  Realm value (11 bytes) and padding (1 byte)
    6f 72 67 00   # }
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    f6 70 24 65   # }
    6d d6 4a 3e   # }
    02 b8 e0 71   # }  HMAC-SHA1 fingerprint
    2e 85 c9 a2   # }
    8c a8 96 66   # }
""")
USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"

# RFC 8489 appendix B.1 (with erratum 6268): USERHASH, PASSWORD-ALGORITHM, SHA-256 integrity.
SAMPLE_SHA256_REQUEST = vector("""
    00 01 00 90   # Request type and message length
    21 12 a4 42   # Magic cookie
    78 ad 34 33   # }
    c6 ad 72 c0   # }  Transaction ID
    29 da 41 2e   # }
    00 1e 00 20   # USERHASH attribute header
    4a 3c f3 8f   # }
    ef 69 92 bd   # }
    a9 52 c6 78   # }
    04 17 da 0f   # }  Userhash value (32 bytes)
    24 81 94 15   # }
    56 9e 60 b2   # }
    05 c4 6e 41   # }
    40 7f 17 04   # }
    00 15 00 29   # NONCE attribute header
    6f 62 4d 61   # }
    74 4a 6f 73   # }
    32 41 41 41   # }
    43 66 2f 2f   # }
    34 39 39 6b   # }  Nonce value and padding (3 bytes)
    39 35 34 64   # }
    36 4f 4c 33   # }
    34 6f 4c 39   # }
    46 53 54 76   # }
    79 36 34 73   # }
    41 00 00 00   # }
    00 14 00 0b   # REALM attribute header
    65 78 61 6d   # }
    70 6c 65 2e   # }  Realm value (11 bytes) and padding (1 byte)
    6f 72 67 00   # }
    00 1d 00 04   # PASSWORD-ALGORITHM attribute header
    00 02 00 00   # PASSWORD-ALGORITHM value (4 bytes)
    00 1c 00 20   # MESSAGE-INTEGRITY-SHA256 attribute header
    b5 c7 bf 00   # }
    5b 6c 52 a2   # }
    1c 51 c5 e8   # }
    92 f8 19 24   # }  HMAC-SHA256 value
    13 62 96 cb   # }
    92 7c 43 14   # }
    93 09 27 8c   # }
    c6 51 8e 65   # }
""")


# ---------------------------------------------------------------------------------------------
# RFC 5769 / RFC 8489 vectors


def test_rfc5769_sample_request() -> None:
    message = parse_message(SAMPLE_REQUEST)
    assert message.message_method == Method.BINDING
    assert message.message_class == Class.REQUEST
    assert message.transaction_id == TRANSACTION_ID
    assert message.attributes["SOFTWARE"] == "STUN test client"
    assert message.attributes["PRIORITY"] == 0x6E0001FF
    assert message.attributes["ICE-CONTROLLED"] == 0x932FF9B151263B36
    assert message.attributes["USERNAME"] == "evtj:h6vY"
    assert message.unknown == []
    assert message.check_message_integrity(short_term_key(SHORT_TERM_PASSWORD))
    assert not message.check_message_integrity(short_term_key("wrong"))


@pytest.mark.parametrize(
    ("data", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_sample_responses(data: bytes, address: tuple[str, int]) -> None:
    message = parse_message(data)
    assert message.message_method == Method.BINDING
    assert message.message_class == Class.RESPONSE
    assert message.attributes["SOFTWARE"] == "test vector"
    assert message.attributes["XOR-MAPPED-ADDRESS"] == address
    assert message.check_message_integrity(short_term_key(SHORT_TERM_PASSWORD))


@pytest.mark.parametrize("data", [SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE])
def test_rfc5769_responses_are_reproduced_from_their_values(data: bytes) -> None:
    """Rebuilding a response gives the same MESSAGE-INTEGRITY and FINGERPRINT once the
    vector's space padding is replaced by the zero padding a sender writes."""
    parsed = parse_message(data)
    rebuilt = Message(Method.BINDING, Class.RESPONSE, parsed.transaction_id)
    rebuilt.attributes["SOFTWARE"] = parsed.attributes["SOFTWARE"]
    rebuilt.attributes["XOR-MAPPED-ADDRESS"] = parsed.attributes["XOR-MAPPED-ADDRESS"]
    rebuilt.add_message_integrity(short_term_key(SHORT_TERM_PASSWORD))
    rebuilt.add_fingerprint()
    zero_padded = data[:20] + data[20:36].replace(b"r ", b"r\x00") + data[36:]
    assert bytes(rebuilt)[:-32] == zero_padded[:-32]
    assert parse_message(bytes(rebuilt)).check_message_integrity(
        short_term_key(SHORT_TERM_PASSWORD)
    )


def test_rfc5769_long_term_request() -> None:
    message = parse_message(SAMPLE_LONG_TERM_REQUEST)
    assert message.attributes["USERNAME"] == USERNAME
    assert message.attributes["NONCE"] == b"f//499k954d6OL34oL9FSTvy64sA"
    assert message.attributes["REALM"] == "example.org"
    assert message.check_message_integrity(long_term_key(USERNAME, "example.org", "TheMatrIX"))
    assert not message.check_message_integrity(long_term_key(USERNAME, "example.org", "x"))
    # Zero padding throughout: the vector survives a round trip byte for byte.
    assert bytes(message) == SAMPLE_LONG_TERM_REQUEST


def test_rfc8489_sha256_request() -> None:
    message = parse_message(SAMPLE_SHA256_REQUEST)
    assert message.attributes["USERHASH"] == userhash(USERNAME, "example.org")
    assert message.attributes["NONCE"] == b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
    assert message.attributes["PASSWORD-ALGORITHM"] == (PASSWORD_SHA256, b"")
    key = long_term_key(USERNAME, "example.org", "TheMatrIX", PASSWORD_SHA256)
    assert message.check_message_integrity(key)
    assert bytes(message) == SAMPLE_SHA256_REQUEST


# ---------------------------------------------------------------------------------------------
# Round trips


def test_every_attribute_round_trips() -> None:
    message = Message(Method.ALLOCATE, Class.RESPONSE)
    message.attributes.update(
        {
            "MAPPED-ADDRESS": ("192.0.2.1", 1),
            "XOR-MAPPED-ADDRESS": ("2001:db8::1", 65535),
            "USERNAME": "1700000000:alice@example.org",
            "ERROR-CODE": (438, "Stale Nonce"),
            "UNKNOWN-ATTRIBUTES": [0x7777, 0x0026],
            "REALM": "example.org",
            "NONCE": b"obMatJos2gAAA",
            "PASSWORD-ALGORITHMS": [(PASSWORD_SHA256, b""), (0x0001, b"")],
            "PASSWORD-ALGORITHM": (PASSWORD_SHA256, b""),
            "USERHASH": bytes(range(32)),
            "SOFTWARE": "natterd",
            "ALTERNATE-SERVER": ("198.51.100.7", 3478),
            "CHANGE-REQUEST": 6,
            "RESPONSE-ORIGIN": ("192.0.2.2", 3478),
            "OTHER-ADDRESS": ("192.0.2.3", 3479),
            "SOURCE-ADDRESS": ("192.0.2.2", 3478),
            "CHANGED-ADDRESS": ("192.0.2.3", 3479),
            "CHANNEL-NUMBER": 0x4001,
            "LIFETIME": 600,
            "XOR-PEER-ADDRESS": [("203.0.113.5", 5000), ("2001:db8::5", 6000)],
            "DATA": b"\x00\x01\x02",
            "XOR-RELAYED-ADDRESS": [("203.0.113.1", 50000)],
            "REQUESTED-ADDRESS-FAMILY": 2,
            "ADDITIONAL-ADDRESS-FAMILY": 2,
            "EVEN-PORT": True,
            "REQUESTED-TRANSPORT": 17,
            "DONT-FRAGMENT": None,
            "RESERVATION-TOKEN": b"12345678",
            "ADDRESS-ERROR-CODE": (2, 440, "Address Family not Supported"),
            "ICMP": (3, 1, 1234),
            "PRIORITY": 1,
            "USE-CANDIDATE": None,
            "ICE-CONTROLLING": 2**64 - 1,
            "ICE-CONTROLLED": 0,
        }
    )
    message.add_message_integrity(b"key")
    message.add_message_integrity_sha256(b"key")
    message.add_fingerprint()
    untested = set(ATTRIBUTES_BY_NAME) - set(message.attributes)
    assert untested == set()
    parsed = parse_message(bytes(message))
    assert parsed == message
    assert parsed.check_message_integrity(b"key")
    assert bytes(parsed) == bytes(message)


def test_requested_transport_holds_the_protocol_number() -> None:
    message = Message(Method.ALLOCATE, Class.REQUEST, attributes={"REQUESTED-TRANSPORT": 17})
    assert bytes(message)[20:] == bytes.fromhex("00190004 11000000")


def test_methods_are_encoded_around_the_class_bits() -> None:
    for method in Method:
        for message_class in Class:
            data = bytes(Message(method, message_class))
            parsed = parse_message(data)
            assert (parsed.message_method, parsed.message_class) == (method, message_class)
    # RFC 8656: a ChannelBind success response is 0x0109, an Allocate error 0x0113.
    assert bytes(Message(Method.CHANNEL_BIND, Class.RESPONSE))[:2] == b"\x01\x09"
    assert bytes(Message(Method.ALLOCATE, Class.ERROR))[:2] == b"\x01\x13"


def test_sha256_integrity_alone_and_truncated() -> None:
    message = Message(Method.BINDING, Class.REQUEST)
    message.add_message_integrity_sha256(b"k")
    parsed = parse_message(bytes(message))
    assert "MESSAGE-INTEGRITY" not in parsed.attributes
    assert parsed.check_message_integrity(b"k")
    # A 16-byte truncation is legal (RFC 8489 section 14.6); the length then counts 16 bytes.
    header = bytes(Message(Method.BINDING, Class.REQUEST, TRANSACTION_ID))
    value = message_integrity(header, b"k", sha256=True, size=16)
    data = header[:2] + b"\x00\x14" + header[4:] + b"\x00\x1c\x00\x10" + value
    assert parse_message(data).check_message_integrity(b"k")
    assert not parse_message(data).check_message_integrity(b"other")


def test_message_without_integrity_fails_the_check() -> None:
    assert not parse_message(bytes(Message(Method.BINDING, Class.REQUEST))).check_message_integrity(
        b"key"
    )


def test_attributes_after_integrity_are_ignored() -> None:
    message = Message(Method.BINDING, Class.REQUEST)
    message.add_message_integrity(b"k")
    data = bytes(message) + bytes.fromhex("80220004 61626364")  # SOFTWARE "abcd" after it
    data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
    parsed = parse_message(data)
    assert "SOFTWARE" not in parsed.attributes
    assert parsed.check_message_integrity(b"k")


def test_unknown_attributes_are_reported_when_comprehension_required() -> None:
    message = bytes(Message(Method.BINDING, Class.REQUEST, TRANSACTION_ID))
    body = bytes.fromhex("7fff0001 01000000 ffff0000 00260000 7fff0000")
    data = message[:2] + struct.pack("!H", len(body)) + message[4:] + body
    assert parse_message(data).unknown == [0x7FFF, 0x0026]


def test_first_occurrence_wins() -> None:
    body = bytes.fromhex("000d0004 00000001 000d0004 00000002")
    header = struct.pack("!HHI", 0x0004, len(body), 0x2112A442) + TRANSACTION_ID
    assert parse_message(header + body).attributes["LIFETIME"] == 1


def test_classic_rfc3489_request_needs_opting_in() -> None:
    # What Debian's `stun` client (0.97) sends: a 16-byte transaction ID, CHANGE-REQUEST 0.
    data = bytes.fromhex("00010008 010bc077da2aa041ba2552508e0ced5c 00030004 00000000")
    with pytest.raises(ValueError, match="^STUN message has no magic cookie$"):
        parse_message(data)
    message = parse_message(data, classic=True)
    assert message.classic
    assert message.transaction_id == bytes.fromhex("010bc077da2aa041ba2552508e0ced5c")
    assert message.attributes == {"CHANGE-REQUEST": 0}
    assert bytes(message) == data
    with pytest.raises(ValueError, match="^STUN XOR addresses need a magic cookie$"):
        bytes(
            Message(
                Method.BINDING,
                Class.RESPONSE,
                message.transaction_id,
                {"XOR-MAPPED-ADDRESS": ("192.0.2.1", 1)},
            )
        )


# ---------------------------------------------------------------------------------------------
# Parse errors: each rule and its exact sentence


def _message(body: bytes, message_type: int = 0x0001) -> bytes:
    return struct.pack("!HHI", message_type, len(body), 0x2112A442) + TRANSACTION_ID + body


EMPTY = _message(b"")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (EMPTY[:8], "STUN message is shorter than 20 bytes"),
        (EMPTY[:-1], "STUN message is shorter than 20 bytes"),
        (_message(b"", 0x8001), "STUN message type has non-zero leading bits"),
        (_message(b"", 0x4001), "STUN message type has non-zero leading bits"),
        (EMPTY[:3] + b"\x02" + EMPTY[4:] + b"\0\0", "STUN message length is not a multiple of 4"),
        (EMPTY + b"\0\0\0\0", "STUN message length does not match"),
        (EMPTY[:4] + b"\0\0\0\0" + EMPTY[8:], "STUN message has no magic cookie"),
        (_message(b"", 0x0002), "STUN message method is unknown"),
    ],
)
def test_header_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_message(data)
    assert str(info.value) == error


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("000d0008 00000001", "STUN attribute length exceeds the message"),
        ("00060005 61626364", "STUN attribute length exceeds the message"),
        ("000d0002 00000000", "STUN attribute must be 4 bytes long"),
        ("00080004 00000000", "STUN attribute must be 20 bytes long"),
        ("001a0004 00000000", "STUN attribute must be empty"),
        ("00010000", "STUN address is shorter than 4 bytes"),
        ("00010004 00010000", "STUN address has invalid length for IPv4"),
        ("00010008 00030001 01020304", "STUN address has unknown family"),
        ("00010008 00020001 01020304", "STUN address has invalid length for IPv6"),
        ("00200014 00010001" + "00" * 16, "STUN address has invalid length for IPv4"),
        ("00060002 c3280000", "STUN text attribute is not valid UTF-8"),
        ("00060204" + "61" * 516, "STUN text attribute is longer than 512 bytes"),
        ("001502fc" + "61" * 764, "STUN text attribute is longer than 763 bytes"),
        ("00090004 00000700", "STUN error code is out of range"),
        ("00090004 00000364", "STUN error code is out of range"),
        ("00090002 00000000", "STUN error code is shorter than 4 bytes"),
        ("000a0003 00010200", "STUN UNKNOWN-ATTRIBUTES length is odd"),
        ("001c000c" + "00" * 12, "STUN MESSAGE-INTEGRITY-SHA256 has invalid length"),
        ("001c0012" + "00" * 20, "STUN MESSAGE-INTEGRITY-SHA256 has invalid length"),
        ("80020006 00010008 00000000", "STUN password algorithm is truncated"),
        ("001d0008 00010000 00020000", "STUN PASSWORD-ALGORITHM must hold one algorithm"),
        ("80280004 00000000", "STUN message fingerprint does not match"),
    ],
)
def test_attribute_errors(body: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_message(_message(bytes.fromhex(body)))
    assert str(info.value) == error


def test_nothing_may_follow_fingerprint() -> None:
    message = Message(Method.BINDING, Class.REQUEST)
    message.add_fingerprint()
    data = bytes(message) + bytes.fromhex("000d0004 00000001")
    data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
    with pytest.raises(ValueError, match="^STUN message has attributes after FINGERPRINT$"):
        parse_message(data)


def test_tampering_breaks_the_fingerprint() -> None:
    message = Message(Method.BINDING, Class.REQUEST, attributes={"SOFTWARE": "abcd"})
    message.add_fingerprint()
    data = bytearray(bytes(message))
    data[24] ^= 1
    with pytest.raises(ValueError, match="^STUN message fingerprint does not match$"):
        parse_message(bytes(data))


# ---------------------------------------------------------------------------------------------
# ChannelData


def test_channel_data_round_trip_and_padding() -> None:
    frame = ChannelData(CHANNEL_MIN, b"hello")
    assert bytes(frame) == b"\x40\x00\x00\x05hello"
    assert frame.padded() == b"\x40\x00\x00\x05hello\x00\x00\x00"
    assert parse_channel_data(bytes(frame)) == frame
    assert parse_channel_data(frame.padded()) == frame
    assert parse_channel_data(b"\x4f\xff\x00\x00") == ChannelData(0x4FFF, b"")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x40\x00\x00", "ChannelData is shorter than 4 bytes"),
        (b"\x50\x00\x00\x00", "ChannelData channel number is out of range"),
        (b"\x3f\xff\x00\x00", "ChannelData channel number is out of range"),
        (b"\x40\x00\x00\x05abcd", "ChannelData length exceeds the message"),
        (b"\x40\x00\x00\x01abcde", "ChannelData has trailing bytes"),
        (b"\x40\x00\x00\x04abcd\x00", "ChannelData has trailing bytes"),
    ],
)
def test_channel_data_errors(data: bytes, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_channel_data(data)
    assert str(info.value) == error
