"""XEP-0160 offline messages, and the mailbox that makes every acknowledged message durable.

A message worth storing (not a bare chat state, no ``no-store`` hint) to a local account is
written to the mailbox table (``offline_messages``) before its sender gets an ack, whether the
recipient is online or not, and its row is deleted only once a client of the recipient
acknowledged it: by XEP-0198 ``<a/>``, or for a client without stream management (which
never acknowledges) once it was written to the socket, the best a server can do. A session
that ends, or a natterd that dies, without that ack leaves the row; it goes out at the next
login. Writes are batched by :class:`xmpp_server.mailbox.Mailbox` (group commit).

Stored copies carry a XEP-0203 ``<delay/>`` so clients show the original time.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from xmpp_server.errors import ResourceConstraint
from xmpp_server.jid import JID
from xmpp_server.mailbox import Letter, Mailbox
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

log = logging.getLogger("natterd.offline")


# Children that do not make a message worth keeping on their own: a "composing" with a
# stanza-id is still only a chat state.
_NOT_CONTENT = (
    *(f"{{{ns}}}" for ns in (NS_CHATSTATES, NS_HINTS, NS_DELAY, "urn:xmpp:sid:0")),
    "{jabber:client}thread",
)


@dataclass(frozen=True)
class OfflineOptions:
    max_per_user: int = field(default=1000, metadata={"min": 0})
    # Group commit: rows per mailbox transaction, and operations queued before senders wait.
    max_batch: int = field(default=1000, metadata={"min": 1})
    max_backlog: int = field(default=10000, metadata={"min": 1})


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
        self.mailbox = Mailbox(
            host.storage.offline,
            max_batch=options.max_batch,
            max_backlog=options.max_backlog,
        )

    def setup(self) -> None:
        self.host.router.add_hook("message/offline", self.store)
        self.host.router.on_available(self.flush)
        self.host.router.keeper = self.keep_live
        self.host.mailbox = self.mailbox

    async def start(self) -> None:
        await self.mailbox.start()

    def _delay(self, message: Element) -> None:
        if message.find(qn(NS_DELAY, "delay")) is None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ET.SubElement(
                message, qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp}
            )

    async def store(self, origin: Session | None, message: Element, to: JID) -> bool:
        if not worth_storing(message):
            return True
        self._delay(message)
        limit = self.options.max_per_user
        user = str(to.bare)
        if await self.mailbox.queue_length(user) >= limit:
            raise ResourceConstraint(f"the recipient's offline storage is full ({limit} messages)")
        await self.mailbox.put(user, tostring(message))
        return True

    async def keep_live(self, message: Element, to: JID, sessions: list[Session]) -> bool:
        """Deliver ``message`` to the recipient's live ``sessions`` with its row in the
        mailbox until one of them acknowledges it; False: not a message to keep (the router
        then just writes it)."""
        if message.get("type", "normal") not in ("chat", "normal") or not worth_storing(message):
            return False
        if all(getattr(s, "sm", None) is None for s in sessions):
            # Clients without stream management never acknowledge: their row would be
            # deleted as soon as the message is written, which happens now. If a session is
            # already closing, the message takes the rescue path (another resource or this
            # mailbox) as before.
            return False
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        xml = partial(self._stored_form, message, stamp)
        letter = await self.mailbox.put(str(to.bare), xml)
        self._deliver_letter(letter, message, sessions)
        return True

    def _stored_form(self, message: Element, stamp: str) -> str:
        """The row's XML: ``message`` with a XEP-0203 delay of when it arrived (the live copy
        has none), made when the row is written, in a shallow copy."""
        if message.find(qn(NS_DELAY, "delay")) is not None:
            return tostring(message)
        stored = copy.copy(message)
        ET.SubElement(stored, qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp})
        return tostring(stored)

    def _deliver_letter(self, letter: Letter, message: Element, sessions: list[Session]) -> None:
        letter.outstanding += len(sessions)
        for session in sessions:
            session.deliver(
                message,
                on_ack=partial(self.mailbox.remove, letter),
                on_lost=partial(self._letter_lost, letter),
            )

    def _letter_lost(self, letter: Letter, message: Element) -> None:
        """A session ended without acknowledging ``letter``: once no session holds it any
        more, give it to the recipient's other available resources; with none, its row
        stays and goes out at the next login."""
        letter.outstanding -= 1
        if letter.outstanding > 0 or letter.state == "dropped" or letter.remove_wanted:
            return
        router = self.host.router
        sessions = [s for s in router.available(JID.parse(letter.user)) if s.priority >= 0]
        if sessions:
            top = max(s.priority for s in sessions)
            self._delay(message)
            self._deliver_letter(letter, message, [s for s in sessions if s.priority == top])

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
            try:
                stanza = fromstring(xml)
            except Exception as exc:  # stored before natterd refused such XML, say
                await self._set_aside(user, msg_id, xml, exc)
                in_flight = self._in_flight.setdefault(user, set())
                continue
            session.deliver(
                stanza,
                on_ack=partial(self._confirmed, user, msg_id),
                on_lost=partial(self._unconfirmed, user, msg_id),
            )

    async def _set_aside(self, user: str, msg_id: int, xml: str, exc: Exception) -> None:
        """One unreadable row must not block the queue: move it to the quarantine table
        (which logs it once) and go on with the rest."""
        try:
            await self.host.storage.quarantine.set_aside(
                user, "offline_messages", msg_id, xml, f"unreadable: {exc}"
            )
        except Exception:
            log.exception("could not set aside unreadable offline row %d of %s", msg_id, user)
        finally:
            self.mailbox.forget_length(user)
            self._in_flight.get(user, set()).discard(msg_id)

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
            self.mailbox.forget_length(user)
            self._deletions += 1
            in_flight = self._in_flight.get(user)
            if in_flight is not None:
                in_flight.difference_update(ids)
                if not in_flight:
                    del self._in_flight[user]

    async def stop(self) -> None:
        if self._deleting is not None:
            await self._deleting
        await self.mailbox.stop()
