"""Cut a TCP/TLS byte stream into STUN messages and ChannelData (RFC 8489 section 6.2.2).

Over a stream nothing marks where a message ends but its own length field; ChannelData is
padded to 4 bytes there (RFC 8656 section 12.5), so both kinds always end on a 4-byte boundary.
"""

from __future__ import annotations

import struct

from stun.message import HEADER_LENGTH, padding_length


class StreamFramer:
    """Sans-IO: ``feed(bytes)`` returns the complete frames; a stream that is neither STUN
    nor ChannelData raises ``ValueError`` (it cannot be resynchronised: close it)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            kind = self._buffer[0] & 0xC0
            (length,) = struct.unpack_from("!H", self._buffer, 2)
            if kind == 0x00:
                if length % 4:
                    raise ValueError("STUN message length is not a multiple of 4")
                size = HEADER_LENGTH + length
            elif kind == 0x40:
                if self._buffer[0] >= 0x50:  # 0x5000-0x7FFF are reserved (RFC 8656)
                    raise ValueError("ChannelData channel number is out of range")
                size = 4 + length + padding_length(length)
            else:
                raise ValueError("stream data is neither STUN nor ChannelData")
            if len(self._buffer) < size:
                break
            frames.append(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back (at most one frame, under 64 KiB)."""
        return len(self._buffer)
