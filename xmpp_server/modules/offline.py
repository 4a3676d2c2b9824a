"""XEP-0160 offline messages: kept for an account with no available resource, flushed in order.

Stored copies carry a XEP-0203 ``<delay/>`` so clients show the original time.
Chat states (XEP-0085) and ``no-store`` hints (XEP-0334) are never stored.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from xmpp_server.errors import ResourceConstraint
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import qn
from xmpp_server.xml import Element, fromstring, tostring

if TYPE_CHECKING:
    from xmpp_server.server import Host

NS_DELAY = "urn:xmpp:delay"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_HINTS = "urn:xmpp:hints"
NS_OFFLINE = "msgoffline"


# Children that do not make a message worth keeping on their own: a "composing" with a
# stanza-id is still only a chat state.
_NOT_CONTENT = (
    *(f"{{{ns}}}" for ns in (NS_CHATSTATES, NS_HINTS, NS_DELAY, "urn:xmpp:sid:0")),
    "{jabber:client}thread",
)


@dataclass(frozen=True)
class OfflineOptions:
    max_per_user: int = field(default=1000, metadata={"min": 0})


def worth_storing(message: Element) -> bool:
    if message.find(qn(NS_HINTS, "no-store")) is not None:
        return False
    if message.find(qn(NS_HINTS, "store")) is not None:
        return True
    return any(not child.tag.startswith(_NOT_CONTENT) for child in message)


class Offline(Module):
    name = "offline"
    options_class = OfflineOptions
    features = (NS_OFFLINE,)

    def __init__(self, host: Host, options: OfflineOptions) -> None:
        super().__init__(host, options)
        self._in_flight: dict[str, set[int]] = {}  # delivered, not yet confirmed
        self._to_delete: dict[str, list[int]] = {}
        self._deleting: asyncio.Future[None] | None = None
        # Batches of confirmed rows deleted so far: a queue read before a deletion finished
        # may hold rows another resource already had, so it is read again.
        self._deletions = 0
        # id(session) → (stamp, queue) while its initial presence runs
        self._prefetched: dict[int, tuple[int, list[tuple[int, str]]]] = {}

    def setup(self) -> None:
        self.host.router.add_hook("message/offline", self.store)
        self.host.router.on_available(self.flush)

    async def store(self, origin: Session | None, message: Element, to: JID) -> bool:
        if not worth_storing(message):
            return True
        if message.find(qn(NS_DELAY, "delay")) is None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ET.SubElement(
                message, qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp}
            )
        limit = self.options.max_per_user
        stored = await self.host.storage.offline.push(str(to.bare), tostring(message), limit=limit)
        if stored is None:
            raise ResourceConstraint(f"the recipient's offline storage is full ({limit} messages)")
        return True

    def stamp(self) -> int:
        """Take before reading a queue to hand to :meth:`prefetched`."""
        return self._deletions

    @contextmanager
    def prefetched(
        self, session: Session, stamp: int, rows: list[tuple[int, str]]
    ) -> Iterator[None]:
        """Let a flush of ``session`` within the block send ``rows``, read by the caller with
        its other login queries (see Storage.initial_presence), instead of reading again."""
        key = id(session)
        self._prefetched[key] = (stamp, rows)
        try:
            yield
        finally:
            self._prefetched.pop(key, None)

    def _take_prefetched(self, session: Session) -> list[tuple[int, str]] | None:
        entry = self._prefetched.pop(id(session), None)
        if entry is None or entry[0] != self._deletions:
            return None
        return entry[1]

    async def flush(self, session: Session) -> None:
        """Send the stored messages in order; each row is deleted only once the client
        acknowledged it (XEP-0198) or, without stream management, once it was written."""
        if session.priority < 0:
            return
        user = str(session.jid.bare)
        rows = self._take_prefetched(session)
        if rows is None:
            rows = await self.host.storage.offline.fetch(user)
        # After the read: a deletion finishing meanwhile may have dropped the user's set.
        in_flight = self._in_flight.setdefault(user, set())
        for msg_id, xml in rows:
            if msg_id in in_flight:
                continue  # another resource has it and has not confirmed yet
            in_flight.add(msg_id)
            session.deliver(
                fromstring(xml),
                on_ack=partial(self._confirmed, user, msg_id),
                on_lost=partial(self._unconfirmed, user, msg_id),
            )

    def _unconfirmed(self, user: str, msg_id: int, _stanza: Element) -> None:
        """The session ended first: the row stays and goes out on the next flush."""
        self._in_flight.get(user, set()).discard(msg_id)

    def _confirmed(self, user: str, msg_id: int) -> None:
        self._to_delete.setdefault(user, []).append(msg_id)
        if self._deleting is None or self._deleting.done():
            self._deleting = asyncio.ensure_future(self._delete_confirmed())

    async def _delete_confirmed(self) -> None:
        """Delete confirmed rows in batches, off the path that delivers them."""
        while self._to_delete:
            user, ids = self._to_delete.popitem()
            await self.host.storage.offline.delete(user, ids)
            self._deletions += 1
            in_flight = self._in_flight.get(user)
            if in_flight is not None:
                in_flight.difference_update(ids)
                if not in_flight:
                    del self._in_flight[user]

    async def stop(self) -> None:
        if self._deleting is not None:
            await self._deleting
