"""XEP-0160 offline messages: kept for an account with no available resource, flushed in order.

Stored copies carry a XEP-0203 ``<delay/>`` so clients show the original time.
Chat states (XEP-0085) and ``no-store`` hints (XEP-0334) are never stored.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime

from xmpp_server.errors import ResourceConstraint
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import qn
from xmpp_server.xml import Element, fromstring, tostring

NS_DELAY = "urn:xmpp:delay"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_HINTS = "urn:xmpp:hints"
NS_OFFLINE = "msgoffline"


@dataclass(frozen=True)
class OfflineOptions:
    max_per_user: int = field(default=1000, metadata={"min": 0})


def worth_storing(message: Element) -> bool:
    if message.find(qn(NS_HINTS, "no-store")) is not None:
        return False
    if message.find(qn(NS_HINTS, "store")) is not None:
        return True
    return any(not child.tag.startswith(f"{{{NS_CHATSTATES}}}") for child in message)


class Offline(Module):
    name = "offline"
    options_class = OfflineOptions
    features = (NS_OFFLINE,)

    def setup(self) -> None:
        self.host.router.add_hook("message/offline", self.store)
        self.host.router.on_available(self.flush)

    async def store(self, origin: Session | None, message: Element, to: JID) -> bool:
        if not worth_storing(message):
            return True
        offline = self.host.storage.offline
        user = str(to.bare)
        if await offline.count(user) >= self.options.max_per_user:
            raise ResourceConstraint("the recipient's offline storage is full")
        if message.find(qn(NS_DELAY, "delay")) is None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ET.SubElement(
                message, qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp}
            )
        await offline.push(user, tostring(message))
        return True

    async def flush(self, session: Session) -> None:
        if session.priority < 0:
            return
        offline = self.host.storage.offline
        user = str(session.jid.bare)
        while True:
            batch = await offline.fetch(user, limit=100)
            if not batch:
                return
            for _id, xml in batch:
                session.deliver(fromstring(xml))
            await offline.delete(user, [msg_id for msg_id, _ in batch])
