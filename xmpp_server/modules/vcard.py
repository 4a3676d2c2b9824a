"""XEP-0054 vcard-temp: each account publishes one vCard, readable by anyone.

The vCard is stored as the XML the user sent, serialised standalone (with its
``xmlns='vcard-temp'``) so it can be parsed back without knowing its context.
Publishing an empty vCard deletes it: there is nothing left worth a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xmpp_server.errors import (
    Forbidden,
    InternalServerError,
    NotAcceptable,
    ServiceUnavailable,
    StreamError,
)
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result, qn
from xmpp_server.xml import NS_CLIENT, Element, fromstring, tostring

NS_VCARD = "vcard-temp"
VCARD = qn(NS_VCARD, "vCard")


@dataclass(frozen=True)
class VCardOptions:
    max_size: int = field(default=65536, metadata={"min": 1})
    """Largest vCard accepted, in bytes of serialised XML (avatars make them big)."""


def dump(vcard: Element) -> str:
    """Serialise with the namespace declared on the root, so :func:`load` needs no context."""
    return tostring(vcard, parent_ns="")


def load(text: str) -> Element:
    """Parse a stored vCard; text written without its xmlns comes back in vcard-temp.

    Raises ValueError or StreamError (the parser's) for text that is not a vCard."""
    vcard = fromstring(text)
    if vcard.tag != VCARD:
        client = f"{{{NS_CLIENT}}}"
        for el in vcard.iter():
            if el.tag.startswith(client):
                el.tag = qn(NS_VCARD, el.tag[len(client) :])
    if vcard.tag != VCARD:
        raise ValueError(f"stored vCard has root {vcard.tag!r}")
    return vcard


class VCard(Module):
    name = "vcard"
    options_class = VCardOptions
    features = (NS_VCARD,)
    account_features = (NS_VCARD,)

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "bare", NS_VCARD, "vCard"), self.on_get)
        router.add_iq(IqKey("set", "bare", NS_VCARD, "vCard"), self.on_set)

    async def on_get(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        stored = await self.host.storage.vcards.get(str(account))
        if stored is None:
            # Your own missing vCard is simply empty. Someone else's is answered exactly as
            # an account that does not exist is (XEP-0054 §3.3: no directory harvesting).
            if requester.bare != account:
                raise ServiceUnavailable()
            vcard = Element(VCARD)
        else:
            try:
                vcard = load(stored)
            except (ValueError, StreamError):
                raise InternalServerError("the stored vCard is damaged") from None
        if origin is not None:
            origin.deliver(iq_result(iq, vcard))

    async def on_set(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        if requester.bare != account:
            raise Forbidden("you can only publish your own vCard")
        vcard = iq.find(VCARD)
        assert vcard is not None  # the router dispatched on it
        empty = len(vcard) == 0 and not (vcard.text or "").strip()
        text = None if empty else dump(vcard)
        if text is not None and len(text.encode()) > self.options.max_size:
            raise NotAcceptable(f"the vCard is larger than {self.options.max_size} bytes")
        await self.host.storage.vcards.set(str(account), text)
        if origin is not None:
            origin.deliver(iq_result(iq))
