"""XEP-0033 Extended Stanza Addressing: the server is a multicast service for its users.

A message to the server's domain with an ``<addresses/>`` header is sent on as one ordinary
copy per ``to``/``cc``/``bcc`` JID, each routed like any message (blocking, offline storage
and error bounces apply per recipient), with the sender's ``from`` unchanged (§3). Copies mark
what was delivered (``delivered='true'``, which also stops loops: such an address is never
sent again) and never show ``bcc`` addresses except each bcc recipient its own (§4.6.3, §6).
``uri`` addresses are not supported and are left unmarked. Presence is not multicast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xmpp_server.errors import BadRequest, JidMalformed, NotAcceptable
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import clone, qn
from xmpp_server.xml import Element

NS_ADDRESS = "http://jabber.org/protocol/address"
ADDRESSES = qn(NS_ADDRESS, "addresses")
ADDRESS = qn(NS_ADDRESS, "address")
RECIPIENT_TYPES = frozenset({"to", "cc", "bcc"})


@dataclass(frozen=True)
class AddressingOptions:
    # XEP-0033 §9 suggests a limit between 20 and 100.
    max_recipients: int = field(default=100, metadata={"min": 1})


@dataclass
class Plan:
    """Who gets a copy, and the header each copy carries."""

    recipients: list[tuple[JID, Element | None]]  # (JID, its own bcc address or None)
    header: Element  # without bcc addresses, delivered ones marked


def _delivered(address: Element) -> Element:
    marked = Element(address.tag, dict(address.attrib))
    marked.set("delivered", "true")
    return marked


def plan(header: Element, limit: int) -> Plan:
    """Check every address before anything is sent (§6: all or nothing), then lay out the
    copies; raises a StanzaError for a malformed header or too many recipients."""
    out = Element(header.tag, dict(header.attrib))
    recipients: list[tuple[JID, Element | None]] = []
    seen: set[JID] = set()
    for address in header:
        kind = address.get("type")
        if address.tag != ADDRESS or kind not in RECIPIENT_TYPES:
            out.append(address)  # noreply, replyto, replyroom, ofrom, extensions: as given
            continue
        jid_text = address.get("jid")
        if jid_text and address.get("uri"):
            raise BadRequest("an address has both 'jid' and 'uri'")
        fresh = address.get("delivered") not in ("true", "1") and bool(jid_text)
        if not fresh:
            # Already delivered by another service, or a URI we cannot send to.
            if kind != "bcc":
                out.append(address)
            continue
        try:
            jid = JID.parse(jid_text or "")
        except ValueError as exc:
            raise JidMalformed(f"address {jid_text!r}: {exc}") from None
        if kind == "bcc":
            if jid not in seen:
                recipients.append((jid, _delivered(address)))
        else:
            out.append(_delivered(address))
            if jid not in seen:
                recipients.append((jid, None))
        seen.add(jid)
        if len(recipients) > limit:
            raise NotAcceptable(f"too many recipients (at most {limit})")
    return Plan(recipients, out)


class Addressing(Module):
    name = "addressing"
    options_class = AddressingOptions
    features = (NS_ADDRESS,)

    def setup(self) -> None:
        self.host.router.add_hook("message/host", self.on_message)

    async def on_message(self, origin: Session | None, message: Element, to: JID) -> bool:
        header = message.find(ADDRESSES)
        if header is None:
            return False
        if origin is None or message.get("type") == "error":
            return True  # only local users multicast (no relaying); errors are never sent on
        layout = plan(header, self.options.max_recipients)
        for jid, own_bcc in layout.recipients:
            copy = clone(message)
            index = list(copy).index(header)
            copy.remove(header)
            if own_bcc is None:
                copy.insert(index, layout.header)
            else:
                personal = Element(layout.header.tag, dict(layout.header.attrib))
                personal.extend([*layout.header, own_bcc])
                copy.insert(index, personal)
            copy.set("to", str(jid))
            await self.host.router.deliver(copy)
        return True
