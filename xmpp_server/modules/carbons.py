"""XEP-0280 Message Carbons: every carbons-enabled resource of an account sees both sides of
its conversations, whichever of the account's devices sent or received them.

Copies are written straight to the sessions, never routed: a copy cannot bounce back to the
original sender and cannot itself be copied. ``<private/>`` or the XEP-0334 ``<no-copy/>``
hint stops copies; ``<private/>`` stays in the message (the XEP no longer asks servers to
strip it: a sender could silently change how a message is delivered). Eligibility follows
§6.1 except for error replies, which would need the server to remember what it copied, so
``urn:xmpp:carbons:rules:0`` is not advertised.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from xmpp_server.errors import ServiceUnavailable
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.offline import NS_CHATSTATES, NS_HINTS
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import clone, iq_addresses, iq_result, make, qn
from xmpp_server.xml import NS_CLIENT, Element

if TYPE_CHECKING:
    from xmpp_server.server import Host

NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_MARKERS = "urn:xmpp:chat-markers:0"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_CONFERENCE = "jabber:x:conference"

# Payloads that make a bodiless message part of a conversation (§6.1, third rule).
_IM_PAYLOADS = (f"{{{NS_RECEIPTS}}}", f"{{{NS_CHATSTATES}}}", f"{{{NS_MARKERS}}}")
_BODY = qn(NS_CLIENT, "body")


def eligible(message: Element, *, sent: bool) -> bool:
    """Whether ``message`` is copied (XEP-0280 §6.1); ``sent``: by a local client, not to one."""
    if message.find(qn(NS_CARBONS, "private")) is not None:
        return False
    if message.find(qn(NS_HINTS, "no-copy")) is not None:
        return False
    if message.find(qn(NS_CARBONS, "sent")) is not None:
        return False  # never a carbon of a carbon
    if message.find(qn(NS_CARBONS, "received")) is not None:
        return False
    type_ = message.get("type", "normal")
    if type_ in ("groupchat", "error"):
        return False
    if message.find(qn(NS_CONFERENCE, "x")) is not None:
        return True  # XEP-0249 direct MUC invitation
    muc = message.find(qn(NS_MUC_USER, "x"))
    if muc is not None:
        # A mediated invitation is copied; a private message from a room participant is not
        # (the room already sends it to every joined client), one to a participant is.
        return muc.find(qn(NS_MUC_USER, "invite")) is not None or sent
    if type_ == "chat":
        return True
    if type_ == "normal" and message.find(_BODY) is not None:
        return True
    return any(child.tag.startswith(_IM_PAYLOADS) for child in message)


def carbon(direction: str, message: Element, user: JID, to: JID) -> Element:
    """``message`` wrapped for ``to``: from the account's bare JID, so clients trust it (§11)."""
    wrapper = make("message", from_=user.bare, to=to, type=message.get("type"))
    outer = ET.SubElement(wrapper, qn(NS_CARBONS, direction))
    ET.SubElement(outer, qn(NS_FORWARD, "forwarded")).append(message)
    return wrapper


class Carbons(Module):
    name = "carbons"
    features = (NS_CARBONS,)

    def __init__(self, host: Host, options: Any) -> None:
        super().__init__(host, options)
        self.enabled: set[JID] = set()
        """Full JIDs of the sessions that enabled carbons; dropped when they unbind."""

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("set", "bare", NS_CARBONS, "enable"), self.on_enable)
        router.add_iq(IqKey("set", "bare", NS_CARBONS, "disable"), self.on_disable)
        router.add_hook("message/sent", self.on_sent, priority=10)
        # Messages to the server itself (XEP-0033 multicast) are part of conversations too;
        # ahead of the hooks that consume them.
        router.add_hook("message/host", self.on_sent, priority=10)
        router.on_delivered(self.on_delivered)
        router.on_unbound(self.on_unbound)

    def _own(self, origin: Session | None, iq: Element) -> Session:
        """Carbons are switched per session, by the session, for its own account only."""
        requester, account = iq_addresses(iq)
        if origin is None or account != requester.bare:
            # As for an account that does not exist: no hint to others that this one does.
            raise ServiceUnavailable()
        return origin

    async def on_enable(self, origin: Session | None, iq: Element) -> None:
        session = self._own(origin, iq)
        self.enabled.add(session.jid)
        session.deliver(iq_result(iq))

    async def on_disable(self, origin: Session | None, iq: Element) -> None:
        session = self._own(origin, iq)
        self.enabled.discard(session.jid)
        session.deliver(iq_result(iq))

    async def on_unbound(self, session: Session) -> None:
        # A new session may already have bound (and enabled carbons on) the same resource.
        if self.host.router.session(session.jid) is None:
            self.enabled.discard(session.jid)

    def _targets(self, user: JID, skip: list[Session]) -> list[Session]:
        return [
            s
            for s in self.host.router.resources(user)
            if s.jid in self.enabled and not any(s is other for other in skip)
        ]

    async def on_sent(self, origin: Session | None, message: Element, to: JID) -> bool:
        """§8: a copy to each carbons-enabled resource of the sender but the sending one, whether
        or not that one enabled carbons."""
        if origin is None or to.bare == origin.jid.bare or not self.enabled:
            return False
        if not eligible(message, sent=True):
            return False
        targets = self._targets(origin.jid.bare, [origin])
        if targets:
            # A snapshot: later hooks add to the message (stanza-id, delay).
            snapshot = clone(message)
            for session in targets:
                session.deliver(carbon("sent", snapshot, origin.jid, session.jid))
        return False

    def on_delivered(self, message: Element, user: JID, sessions: list[Session]) -> None:
        """§7: a copy to each carbons-enabled resource the message was not written to."""
        if not self.enabled:
            return
        try:
            sender = JID.parse(message.get("from") or self.host.domain)
        except ValueError:
            return
        if sender.bare == user.bare or not eligible(message, sent=False):
            return
        targets = self._targets(user, sessions)
        if targets:
            snapshot = clone(message)
            for session in targets:
                session.deliver(carbon("received", snapshot, user, session.jid))
