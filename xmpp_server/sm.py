"""XEP-0198 Stream Management counters and the queue of unacknowledged stanzas (sans-IO).

The stream answers ``<r/>`` with the number of stanzas it *handled*; the shell counts a
stanza handled only once routing finished, i.e. once the stanza was written to a live
session or stored durably. Outbound stanzas stay queued until the client acknowledges
them; what is still queued when a session ends for good is handed to ``on_lost``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from xmpp_server.errors import StreamError
from xmpp_server.xml import Element

NS_SM = "urn:xmpp:sm:3"
MAX_SEQ = 1 << 32


@dataclass(slots=True)
class Pending:
    """One stanza sent but not yet acknowledged, with what to do when it is, or never is."""

    stanza: Element
    on_ack: Callable[[], None] | None = None
    on_lost: Callable[[Element], None] | None = None


class StreamManagement:
    """The SM state of one session; it survives the connection when the stream is resumable."""

    def __init__(self, sm_id: str, *, resumable: bool, max_unacked: int = 10000) -> None:
        self.id = sm_id
        self.resumable = resumable
        self.max_unacked = max_unacked
        self.handled = 0  # inbound stanzas handled (what we report in <a h=…/>)
        self.acked = 0  # outbound stanzas the client has acknowledged (mod 2^32)
        self.queue: deque[Pending] = deque()

    @property
    def sent(self) -> int:
        return (self.acked + len(self.queue)) % MAX_SEQ

    def count_handled(self) -> None:
        self.handled = (self.handled + 1) % MAX_SEQ

    def track(self, pending: Pending) -> bool:
        """Queue a sent stanza; False when the client is too far behind on acks."""
        self.queue.append(pending)
        return len(self.queue) <= self.max_unacked

    def ack(self, h: int) -> list[Pending]:
        """Apply the client's ``h``; return the stanzas it newly acknowledged."""
        count = (h - self.acked) % MAX_SEQ
        if count > len(self.queue):
            # XEP-0198 (Acks): the stream error says what the client claimed and what was sent.
            too_high = Element(
                f"{{{NS_SM}}}handled-count-too-high", {"h": str(h), "send-count": str(self.sent)}
            )
            raise StreamError(
                "undefined-condition",
                f"acknowledged {count} stanzas but only {len(self.queue)} were unacknowledged",
                extra=[too_high],
            )
        done = [self.queue.popleft() for _ in range(count)]
        self.acked = h % MAX_SEQ
        return done

    def take_unacked(self) -> list[Pending]:
        """Everything still unacknowledged, removed from the queue (the session is over)."""
        pending = list(self.queue)
        self.acked = self.sent
        self.queue.clear()
        return pending


def parse_h(element: Element) -> int:
    try:
        h = int(element.get("h", ""))
    except ValueError:
        raise StreamError("invalid-xml", "'h' must be an unsigned 32-bit integer") from None
    if not 0 <= h < MAX_SEQ:
        raise StreamError("invalid-xml", "'h' must be an unsigned 32-bit integer")
    return h
