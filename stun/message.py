"""STUN messages (RFC 8489) with the TURN (RFC 8656) and NAT discovery (RFC 5780) attributes.

A pure codec: ``parse_message(data)`` and ``bytes(message)``, plus ``parse_channel_data`` and
``bytes(ChannelData)``. Every malformed input raises ``ValueError`` with a fixed sentence, so
the server can drop it in one place and tests can assert which rule was broken.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

COOKIE = 0x2112A442
COOKIE_BYTES = struct.pack("!I", COOKIE)
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
TRANSPORT_UDP = 17  # REQUESTED-TRANSPORT carries an IP protocol number
CHANGE_IP = 0x04  # CHANGE-REQUEST flags (RFC 5780 section 7.2)
CHANGE_PORT = 0x02
PASSWORD_MD5 = 0x0001  # PASSWORD-ALGORITHM values (RFC 8489 section 18.5)
PASSWORD_SHA256 = 0x0002
CHANNEL_MIN = 0x4000  # RFC 8656 section 12: 0x5000-0x7FFF are reserved
CHANNEL_MAX = 0x4FFF
MAX_TEXT = 763  # REALM, NONCE, SOFTWARE, reason phrases: fewer than 128 characters
MAX_USERNAME = 512

Address = tuple[str, int]


class Method(enum.IntEnum):
    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Class(enum.IntEnum):
    """The class bits in their place in the message type (C1 is bit 8, C0 is bit 4)."""

    REQUEST = 0x000
    INDICATION = 0x010
    RESPONSE = 0x100
    ERROR = 0x110


def padding_length(length: int) -> int:
    """STUN attributes (and ChannelData over streams) are padded to a 4-byte boundary."""
    return -length % 4


def random_transaction_id() -> bytes:
    return os.urandom(12)


# ---------------------------------------------------------------------------------------------
# Attribute values: pack(value, transaction_id) -> bytes, unpack(data, transaction_id) -> value.
# The transaction ID only matters to the XOR-ed addresses; one signature keeps the table simple.


def _xor_pad(transaction_id: bytes) -> bytes:
    # The port is XOR-ed with the cookie's top half, the address with cookie + transaction ID.
    return COOKIE_BYTES[:2] + COOKIE_BYTES + transaction_id


def _xor(data: bytes, pad: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, pad, strict=False))


def _pack_address(value: Address, pad: bytes | None) -> bytes:
    ip = ipaddress.ip_address(value[0])
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    port_address = struct.pack("!H", value[1]) + ip.packed
    if pad is not None:
        port_address = _xor(port_address, pad)
    return struct.pack("!BB", 0, family) + port_address


def _unpack_address(data: bytes, pad: bytes | None) -> Address:
    if len(data) < 4:
        raise ValueError("STUN address is shorter than 4 bytes")
    family = data[1]
    if family == FAMILY_IPV4:
        if len(data) != 8:
            raise ValueError("STUN address has invalid length for IPv4")
    elif family == FAMILY_IPV6:
        if len(data) != 20:
            raise ValueError("STUN address has invalid length for IPv6")
    else:
        raise ValueError("STUN address has unknown family")
    port_address = data[2:] if pad is None else _xor(data[2:], pad)
    ip = ipaddress.ip_address(port_address[2:])
    return str(ip), struct.unpack("!H", port_address[:2])[0]


def pack_address(value: Address, transaction_id: bytes) -> bytes:
    return _pack_address(value, None)


def unpack_address(data: bytes, transaction_id: bytes) -> Address:
    return _unpack_address(data, None)


def pack_xor_address(value: Address, transaction_id: bytes) -> bytes:
    if len(transaction_id) != 12:
        raise ValueError("STUN XOR addresses need a magic cookie")
    return _pack_address(value, _xor_pad(transaction_id))


def unpack_xor_address(data: bytes, transaction_id: bytes) -> Address:
    if len(transaction_id) != 12:
        raise ValueError("STUN XOR addresses need a magic cookie")
    return _unpack_address(data, _xor_pad(transaction_id))


def _bytes(
    size: int | None = None, limit: int | None = None
) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    def pack(value: bytes, transaction_id: bytes) -> bytes:
        return value

    def unpack(data: bytes, transaction_id: bytes) -> bytes:
        if size is not None and len(data) != size:
            raise ValueError(f"STUN attribute must be {size} bytes long")
        if limit is not None and len(data) > limit:
            raise ValueError(f"STUN text attribute is longer than {limit} bytes")
        return data

    return pack, unpack


def _text(limit: int) -> tuple[Callable[..., bytes], Callable[..., str]]:
    def pack(value: str, transaction_id: bytes) -> bytes:
        return value.encode()

    def unpack(data: bytes, transaction_id: bytes) -> str:
        if len(data) > limit:
            raise ValueError(f"STUN text attribute is longer than {limit} bytes")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ValueError("STUN text attribute is not valid UTF-8") from None

    return pack, unpack


def _uint(size: int, shift: int = 0) -> tuple[Callable[..., bytes], Callable[..., int]]:
    """An unsigned integer in the first bytes of a ``size``-byte value; ``shift`` drops the
    trailing reserved bits (REQUESTED-TRANSPORT keeps its protocol in the top byte)."""
    fmt = {1: "!B", 2: "!H", 4: "!I", 8: "!Q"}[size]

    def pack(value: int, transaction_id: bytes) -> bytes:
        return struct.pack(fmt, value << shift)

    def unpack(data: bytes, transaction_id: bytes) -> int:
        if len(data) != size:
            raise ValueError(f"STUN attribute must be {size} bytes long")
        value: int = struct.unpack(fmt, data)[0]
        return value >> shift

    return pack, unpack


def pack_channel_number(value: int, transaction_id: bytes) -> bytes:
    return struct.pack("!HH", value, 0)


def unpack_channel_number(data: bytes, transaction_id: bytes) -> int:
    if len(data) != 4:
        raise ValueError("STUN attribute must be 4 bytes long")
    value: int = struct.unpack("!H", data[:2])[0]
    return value


def pack_family(value: int, transaction_id: bytes) -> bytes:
    return struct.pack("!B3x", value)


def unpack_family(data: bytes, transaction_id: bytes) -> int:
    if len(data) != 4:
        raise ValueError("STUN attribute must be 4 bytes long")
    return data[0]


def pack_none(value: None, transaction_id: bytes) -> bytes:
    return b""


def unpack_none(data: bytes, transaction_id: bytes) -> None:
    if data:
        raise ValueError("STUN attribute must be empty")


def pack_even_port(value: bool, transaction_id: bytes) -> bytes:
    return b"\x80" if value else b"\x00"


def unpack_even_port(data: bytes, transaction_id: bytes) -> bool:
    """True when the R bit asks to reserve the next port as well."""
    if len(data) != 1:
        raise ValueError("STUN attribute must be 1 bytes long")
    return bool(data[0] & 0x80)


def _check_error_code(code: int) -> None:
    if not 300 <= code <= 699:
        raise ValueError("STUN error code is out of range")


def pack_error_code(value: tuple[int, str], transaction_id: bytes) -> bytes:
    code, reason = value
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def unpack_error_code(data: bytes, transaction_id: bytes) -> tuple[int, str]:
    if len(data) < 4:
        raise ValueError("STUN error code is shorter than 4 bytes")
    number = data[3]
    if number > 99:
        raise ValueError("STUN error code is out of range")
    code = (data[2] & 0x07) * 100 + number
    _check_error_code(code)
    return code, _unpack_text(data[4:], transaction_id)


def pack_address_error_code(value: tuple[int, int, str], transaction_id: bytes) -> bytes:
    """ADDRESS-ERROR-CODE (RFC 8656 section 18.13): family, then an ERROR-CODE body."""
    family, code, reason = value
    return struct.pack("!BxBB", family, code // 100, code % 100) + reason.encode()


def unpack_address_error_code(data: bytes, transaction_id: bytes) -> tuple[int, int, str]:
    if len(data) < 4:
        raise ValueError("STUN error code is shorter than 4 bytes")
    code, reason = unpack_error_code(b"\x00\x00" + data[2:], transaction_id)
    return data[0], code, reason


def pack_unknown_attributes(value: list[int], transaction_id: bytes) -> bytes:
    return b"".join(struct.pack("!H", attr_type) for attr_type in value)


def unpack_unknown_attributes(data: bytes, transaction_id: bytes) -> list[int]:
    if len(data) % 2:
        raise ValueError("STUN UNKNOWN-ATTRIBUTES length is odd")
    return [value for (value,) in struct.iter_unpack("!H", data)]


def _pack_algorithm(algorithm: int, params: bytes) -> bytes:
    return struct.pack("!HH", algorithm, len(params)) + params + bytes(padding_length(len(params)))


def pack_algorithm(value: tuple[int, bytes], transaction_id: bytes) -> bytes:
    return _pack_algorithm(*value)


def pack_algorithms(value: list[tuple[int, bytes]], transaction_id: bytes) -> bytes:
    return b"".join(_pack_algorithm(*item) for item in value)


def unpack_algorithms(data: bytes, transaction_id: bytes) -> list[tuple[int, bytes]]:
    algorithms = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("STUN password algorithm is truncated")
        algorithm, length = struct.unpack("!HH", data[pos : pos + 4])
        end = pos + 4 + length
        if end + padding_length(length) > len(data):
            raise ValueError("STUN password algorithm is truncated")
        algorithms.append((algorithm, data[pos + 4 : end]))
        pos = end + padding_length(length)
    return algorithms


def unpack_algorithm(data: bytes, transaction_id: bytes) -> tuple[int, bytes]:
    algorithms = unpack_algorithms(data, transaction_id)
    if len(algorithms) != 1:
        raise ValueError("STUN PASSWORD-ALGORITHM must hold one algorithm")
    return algorithms[0]


def pack_mi_sha256(value: bytes, transaction_id: bytes) -> bytes:
    return value


def unpack_mi_sha256(data: bytes, transaction_id: bytes) -> bytes:
    # RFC 8489 section 14.6: truncated to at least 16 bytes, in multiples of 4.
    if len(data) < 16 or len(data) > 32 or len(data) % 4:
        raise ValueError("STUN MESSAGE-INTEGRITY-SHA256 has invalid length")
    return data


def pack_icmp(value: tuple[int, int, int], transaction_id: bytes) -> bytes:
    icmp_type, code, error_data = value
    return struct.pack("!HBBI", 0, icmp_type, code, error_data)


def unpack_icmp(data: bytes, transaction_id: bytes) -> tuple[int, int, int]:
    """(ICMP type, ICMP code, error data) as the relay saw them (RFC 8656 section 18.12)."""
    if len(data) != 8:
        raise ValueError("STUN attribute must be 8 bytes long")
    _, icmp_type, code, error_data = struct.unpack("!HBBI", data)
    return icmp_type, code, error_data


_unpack_text = _text(MAX_TEXT)[1]


class AttributeType(NamedTuple):
    """One row of the registration table: how an attribute type is named, packed and read."""

    type: int
    name: str
    pack: Callable[..., bytes]
    unpack: Callable[..., Any]
    repeatable: bool = False  # True: the value is a list of every occurrence, in order


_address = (pack_address, unpack_address)
_xor_address = (pack_xor_address, unpack_xor_address)

ATTRIBUTES: list[AttributeType] = [
    AttributeType(0x0001, "MAPPED-ADDRESS", *_address),
    AttributeType(0x0003, "CHANGE-REQUEST", *_uint(4)),
    AttributeType(0x0004, "SOURCE-ADDRESS", *_address),  # RFC 3489, for classic clients
    AttributeType(0x0005, "CHANGED-ADDRESS", *_address),  # RFC 3489, for classic clients
    AttributeType(0x0006, "USERNAME", *_text(MAX_USERNAME)),
    AttributeType(0x0008, "MESSAGE-INTEGRITY", *_bytes(20)),
    AttributeType(0x0009, "ERROR-CODE", pack_error_code, unpack_error_code),
    AttributeType(0x000A, "UNKNOWN-ATTRIBUTES", pack_unknown_attributes, unpack_unknown_attributes),
    AttributeType(0x000C, "CHANNEL-NUMBER", pack_channel_number, unpack_channel_number),
    AttributeType(0x000D, "LIFETIME", *_uint(4)),
    AttributeType(0x0012, "XOR-PEER-ADDRESS", *_xor_address, repeatable=True),
    AttributeType(0x0013, "DATA", *_bytes()),
    AttributeType(0x0014, "REALM", *_text(MAX_TEXT)),
    AttributeType(0x0015, "NONCE", *_bytes(limit=MAX_TEXT)),
    AttributeType(0x0016, "XOR-RELAYED-ADDRESS", *_xor_address, repeatable=True),
    AttributeType(0x0017, "REQUESTED-ADDRESS-FAMILY", pack_family, unpack_family),
    AttributeType(0x0018, "EVEN-PORT", pack_even_port, unpack_even_port),
    AttributeType(0x0019, "REQUESTED-TRANSPORT", *_uint(4, shift=24)),
    AttributeType(0x001A, "DONT-FRAGMENT", pack_none, unpack_none),
    AttributeType(0x001C, "MESSAGE-INTEGRITY-SHA256", pack_mi_sha256, unpack_mi_sha256),
    AttributeType(0x001D, "PASSWORD-ALGORITHM", pack_algorithm, unpack_algorithm),
    AttributeType(0x001E, "USERHASH", *_bytes(32)),
    AttributeType(0x0020, "XOR-MAPPED-ADDRESS", *_xor_address),
    AttributeType(0x0022, "RESERVATION-TOKEN", *_bytes(8)),
    AttributeType(0x0024, "PRIORITY", *_uint(4)),  # ICE (RFC 8445), so checks parse
    AttributeType(0x0025, "USE-CANDIDATE", pack_none, unpack_none),
    AttributeType(0x8000, "ADDITIONAL-ADDRESS-FAMILY", pack_family, unpack_family),
    AttributeType(0x8001, "ADDRESS-ERROR-CODE", pack_address_error_code, unpack_address_error_code),
    AttributeType(0x8002, "PASSWORD-ALGORITHMS", pack_algorithms, unpack_algorithms),
    AttributeType(0x8004, "ICMP", pack_icmp, unpack_icmp),
    AttributeType(0x8022, "SOFTWARE", *_text(MAX_TEXT)),
    AttributeType(0x8023, "ALTERNATE-SERVER", *_address),
    AttributeType(0x8028, "FINGERPRINT", *_uint(4)),
    AttributeType(0x8029, "ICE-CONTROLLED", *_uint(8)),
    AttributeType(0x802A, "ICE-CONTROLLING", *_uint(8)),
    AttributeType(0x802B, "RESPONSE-ORIGIN", *_address),
    AttributeType(0x802C, "OTHER-ADDRESS", *_address),
]

ATTRIBUTES_BY_TYPE = {attr.type: attr for attr in ATTRIBUTES}
ATTRIBUTES_BY_NAME = {attr.name: attr for attr in ATTRIBUTES}

# Attributes that follow MESSAGE-INTEGRITY(-SHA256) and are still read (RFC 8489 section 14.5).
_AFTER_INTEGRITY = {
    "MESSAGE-INTEGRITY": {"MESSAGE-INTEGRITY-SHA256", "FINGERPRINT"},
    "MESSAGE-INTEGRITY-SHA256": {"FINGERPRINT"},
}


def _with_length(data: bytes, length: int) -> bytes:
    """``data`` with its header's length field set to ``length``, as integrity checks see it."""
    return data[:2] + struct.pack("!H", length) + data[4:]


def message_fingerprint(data: bytes) -> int:
    """CRC-32 of the message up to FINGERPRINT, with the length counting FINGERPRINT."""
    covered = _with_length(data, len(data) - HEADER_LENGTH + 8)
    return binascii.crc32(covered) ^ FINGERPRINT_XOR


def message_integrity(data: bytes, key: bytes, sha256: bool = False, size: int = 32) -> bytes:
    """HMAC of the message up to the integrity attribute, the length counting that attribute."""
    size = size if sha256 else 20
    covered = _with_length(data, len(data) - HEADER_LENGTH + 4 + size)
    return hmac.new(key, covered, "sha256" if sha256 else "sha1").digest()[:size]


def short_term_key(password: str) -> bytes:
    """RFC 8489 section 9.1.1 (OpaqueString processing left to the caller)."""
    return password.encode()


def long_term_key(username: str, realm: str, password: str, algorithm: int = PASSWORD_MD5) -> bytes:
    """RFC 8489 section 9.2.2: MD5 or SHA-256 of ``username:realm:password``."""
    text = f"{username}:{realm}:{password}".encode()
    if algorithm == PASSWORD_SHA256:
        return hashlib.sha256(text).digest()
    if algorithm == PASSWORD_MD5:
        return hashlib.md5(text).digest()
    raise ValueError("STUN password algorithm is unknown")


def userhash(username: str, realm: str) -> bytes:
    """USERHASH (RFC 8489 section 14.4)."""
    return hashlib.sha256(f"{username}:{realm}".encode()).digest()


@dataclass
class Message:
    """A STUN message. Attribute values are keyed by name, in wire order (see ``ATTRIBUTES``)."""

    message_method: Method
    message_class: Class
    transaction_id: bytes = field(default_factory=random_transaction_id)
    """12 bytes after the magic cookie, or 16 bytes for an RFC 3489 ("classic") message."""
    attributes: dict[str, Any] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)
    """Comprehension-required attribute types we do not understand (answered with 420)."""
    _integrity_data: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def classic(self) -> bool:
        """An RFC 3489 message: no magic cookie, so no XOR addresses, integrity or FINGERPRINT."""
        return len(self.transaction_id) == 16

    @property
    def error_code(self) -> int | None:
        value = self.attributes.get("ERROR-CODE")
        return None if value is None else int(value[0])

    def add_message_integrity(self, key: bytes) -> None:
        """Append MESSAGE-INTEGRITY (HMAC-SHA1): the last step but FINGERPRINT before sending."""
        self._add_integrity("MESSAGE-INTEGRITY", key)

    def add_message_integrity_sha256(self, key: bytes) -> None:
        """Append MESSAGE-INTEGRITY-SHA256 (after MESSAGE-INTEGRITY, if there is one)."""
        self._add_integrity("MESSAGE-INTEGRITY-SHA256", key)

    def _add_integrity(self, name: str, key: bytes) -> None:
        self.attributes.pop("FINGERPRINT", None)
        self.attributes.pop("MESSAGE-INTEGRITY-SHA256", None)
        if name == "MESSAGE-INTEGRITY-SHA256":
            data = bytes(self)
        else:
            self.attributes.pop("MESSAGE-INTEGRITY", None)
            data = bytes(self)
        self._integrity_data[name] = data
        self.attributes[name] = message_integrity(data, key, name == "MESSAGE-INTEGRITY-SHA256")

    def add_fingerprint(self) -> None:
        """Append FINGERPRINT; it covers everything, so it is always added last."""
        self.attributes.pop("FINGERPRINT", None)
        self.attributes["FINGERPRINT"] = message_fingerprint(bytes(self))

    def check_message_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY-SHA256 if present (RFC 8489 section 9.2.4), else
        MESSAGE-INTEGRITY, against ``key``. A message with neither fails."""
        for name, sha256 in (("MESSAGE-INTEGRITY-SHA256", True), ("MESSAGE-INTEGRITY", False)):
            data = self._integrity_data.get(name)
            if data is not None:
                value: bytes = self.attributes[name]
                expected = message_integrity(data, key, sha256, len(value))
                return hmac.compare_digest(value, expected)
        return False

    def __bytes__(self) -> bytes:
        body = bytearray()
        for name, value in self.attributes.items():
            attr = ATTRIBUTES_BY_NAME[name]
            for item in value if attr.repeatable else [value]:
                data = attr.pack(item, self.transaction_id)
                body += struct.pack("!HH", attr.type, len(data))
                body += data + bytes(padding_length(len(data)))
        message_type = _encode_type(self.message_method, self.message_class)
        header = struct.pack("!HH", message_type, len(body))
        if self.classic:
            return header + self.transaction_id + bytes(body)
        if len(self.transaction_id) != 12:
            raise ValueError("STUN transaction ID must be 12 bytes long")
        return header + COOKIE_BYTES + self.transaction_id + bytes(body)


def _encode_type(method: int, message_class: int) -> int:
    # The method's 12 bits are split around the two class bits: M11-M7 C1 M6-M4 C0 M3-M0.
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | message_class


def _decode_type(message_type: int) -> tuple[int, Class]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1)
    method |= (message_type & 0x3E00) >> 2
    return method, Class(message_type & 0x0110)


def parse_message(data: bytes, *, classic: bool = False) -> Message:
    """Parse one STUN message and check its FINGERPRINT.

    MESSAGE-INTEGRITY is checked later, with ``Message.check_message_integrity()``, once the
    key is known. ``classic=True`` also accepts RFC 3489 messages (no magic cookie).
    """
    if len(data) < HEADER_LENGTH:
        raise ValueError("STUN message is shorter than 20 bytes")
    message_type, length, cookie = struct.unpack("!HHI", data[:8])
    if message_type & 0xC000:
        raise ValueError("STUN message type has non-zero leading bits")
    if length % 4:
        raise ValueError("STUN message length is not a multiple of 4")
    if len(data) != HEADER_LENGTH + length:
        raise ValueError("STUN message length does not match")
    if cookie == COOKIE:
        transaction_id = data[8:20]
    elif classic:
        transaction_id = data[4:20]
    else:
        raise ValueError("STUN message has no magic cookie")
    method_number, message_class = _decode_type(message_type)
    try:
        method = Method(method_number)
    except ValueError:
        raise ValueError("STUN message method is unknown") from None

    message = Message(method, message_class, transaction_id)
    attributes = message.attributes
    after: set[str] | None = None  # once integrity is seen: the names still read
    pos = HEADER_LENGTH
    while pos < len(data):
        attr_type, attr_length = struct.unpack("!HH", data[pos : pos + 4])
        end = pos + 4 + attr_length
        if end + padding_length(attr_length) > len(data):
            raise ValueError("STUN attribute length exceeds the message")
        if "FINGERPRINT" in attributes:
            raise ValueError("STUN message has attributes after FINGERPRINT")
        attr = ATTRIBUTES_BY_TYPE.get(attr_type)
        name = attr.name if attr is not None else None
        if after is not None and name not in after:
            pass  # not covered by MESSAGE-INTEGRITY: ignored (RFC 8489 section 14.5)
        elif attr is None:
            if attr_type < 0x8000 and attr_type not in message.unknown:
                message.unknown.append(attr_type)
        elif attr.repeatable:
            attributes.setdefault(attr.name, []).append(
                attr.unpack(data[pos + 4 : end], transaction_id)
            )
        elif attr.name not in attributes:  # later duplicates are ignored
            value = attr.unpack(data[pos + 4 : end], transaction_id)
            if attr.name == "FINGERPRINT":
                if message.classic or value != message_fingerprint(data[:pos]):
                    raise ValueError("STUN message fingerprint does not match")
            elif attr.name in _AFTER_INTEGRITY:
                message._integrity_data[attr.name] = data[:pos]
                after = _AFTER_INTEGRITY[attr.name]
            attributes[attr.name] = value
        pos = end + padding_length(attr_length)
    return message


# ---------------------------------------------------------------------------------------------
# ChannelData (RFC 8656 section 12.4)


@dataclass(frozen=True)
class ChannelData:
    """Application data on a bound channel: a 4-byte header instead of a 36-byte Send."""

    channel: int
    data: bytes

    def __bytes__(self) -> bytes:
        return struct.pack("!HH", self.channel, len(self.data)) + self.data

    def padded(self) -> bytes:
        """The stream (TCP/TLS) form, padded to 4 bytes (RFC 8656 section 12.5)."""
        return bytes(self) + bytes(padding_length(len(self.data)))


def is_channel_data(data: bytes) -> bool:
    """ChannelData starts with 0b01; STUN messages with 0b00 (RFC 7983 demultiplexing)."""
    return len(data) > 0 and data[0] & 0xC0 == 0x40


def parse_channel_data(data: bytes) -> ChannelData:
    """Parse ChannelData, with or without its padding."""
    if len(data) < 4:
        raise ValueError("ChannelData is shorter than 4 bytes")
    channel, length = struct.unpack("!HH", data[:4])
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError("ChannelData channel number is out of range")
    if 4 + length > len(data):
        raise ValueError("ChannelData length exceeds the message")
    if len(data) - 4 - length not in (0, padding_length(length)):
        raise ValueError("ChannelData has trailing bytes")
    return ChannelData(channel, data[4 : 4 + length])
