"""The answer to a plain Binding request, straight from and to bytes.

Nearly all STUN traffic is ICE candidate gathering: a Binding request with no attributes,
or with FINGERPRINT alone. Parsing it into a ``Message`` and serialising the answer through
the attribute table cost most of a request's CPU; here the answer is packed directly. The
bytes are identical to what ``StunServer`` builds on its general path (the tests compare
them), and anything else (other attributes, RFC 3489 requests, a bad FINGERPRINT) returns
None and takes that path.
"""

from __future__ import annotations

import binascii
import socket
import struct

from stun.message import COOKIE, COOKIE_BYTES, FINGERPRINT_XOR, HEADER_LENGTH
from stun.network import Address

_BINDING_REQUEST = b"\x00\x01"
_BINDING_SUCCESS = b"\x01\x01"
_FINGERPRINT_HEAD = b"\x80\x28\x00\x04"
_XOR_MAPPED_ADDRESS = 0x0020
_SOFTWARE = 0x8022


def software_attribute(software: str | None) -> bytes:
    """SOFTWARE as it follows XOR-MAPPED-ADDRESS in every answer (empty when not sent)."""
    if software is None:
        return b""
    value = software.encode()
    return struct.pack("!HH", _SOFTWARE, len(value)) + value + bytes(-len(value) % 4)


def binding_success(data: bytes, client: Address, software: bytes) -> bytes | None:
    """The success response to ``data`` if it is a plain RFC 8489 Binding request from
    ``client``; ``software`` is :func:`software_attribute`'s bytes. None otherwise."""
    size = len(data)
    if size == HEADER_LENGTH:
        fingerprint = False
    elif size == HEADER_LENGTH + 8 and data[20:24] == _FINGERPRINT_HEAD:
        fingerprint = True
        expected = (binascii.crc32(data[:20]) ^ FINGERPRINT_XOR).to_bytes(4, "big")
        if data[24:28] != expected:
            return None
    else:
        return None
    if (
        data[:2] != _BINDING_REQUEST
        or data[4:8] != COOKIE_BYTES
        or int.from_bytes(data[2:4], "big") != size - HEADER_LENGTH
    ):
        return None
    transaction_id = data[8:20]
    host, port = client
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        pad = int.from_bytes(COOKIE_BYTES + transaction_id, "big")
        address = struct.pack("!BBH", 0, 2, port ^ (COOKIE >> 16)) + (
            int.from_bytes(packed, "big") ^ pad
        ).to_bytes(16, "big")
    else:
        packed = socket.inet_aton(host)
        address = struct.pack(
            "!BBHI", 0, 1, port ^ (COOKIE >> 16), int.from_bytes(packed, "big") ^ COOKIE
        )
    body = struct.pack("!HH", _XOR_MAPPED_ADDRESS, len(address)) + address + software
    length = len(body) + (8 if fingerprint else 0)
    answer = _BINDING_SUCCESS + length.to_bytes(2, "big") + COOKIE_BYTES + transaction_id + body
    if fingerprint:
        crc = binascii.crc32(answer) ^ FINGERPRINT_XOR
        answer += _FINGERPRINT_HEAD + crc.to_bytes(4, "big")
    return answer
