"""The seam between the sans-IO server cores and the sockets that carry their bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Address = tuple[str, int]
Transport = Literal["udp", "tcp", "tls"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A client's 5-tuple: how it reached us. TURN allocations are keyed by it."""

    transport: Transport
    client: Address
    server: Address
    """The local address the client sent to (the listening socket's address)."""

    @property
    def stream(self) -> bool:
        """TCP and TLS carry a byte stream: ChannelData must be padded there."""
        return self.transport != "udp"


class Network(Protocol):
    """What the cores ask of the I/O layer. Sending never fails loudly: a datagram that
    cannot be sent is lost, as it could be on the wire."""

    def send(self, endpoint: Endpoint, data: bytes, source: Address | None = None) -> None:
        """Send to a client; ``source`` picks another local UDP address (RFC 5780)."""

    def open_relay(self, address: Address, dont_fragment: bool) -> bool:
        """Bind a UDP relay socket at ``address``; False if that port is taken."""

    def close_relay(self, address: Address) -> None: ...

    def send_from_relay(self, relay: Address, peer: Address, data: bytes) -> None:
        """Send ``data`` to ``peer`` from the relay socket bound at ``relay``."""
