"""RFC 3921 §3 session establishment: obsolete, but old clients still send it (RFC 6121 app. E)."""

from __future__ import annotations

from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result
from xmpp_server.stream import NS_SESSION
from xmpp_server.xml import Element


class LegacySession(Module):
    name = "session"

    def setup(self) -> None:
        self.host.router.add_iq(IqKey("set", "host", NS_SESSION, "session"), self.establish)
        self.host.router.add_iq(IqKey("set", "bare", NS_SESSION, "session"), self.establish)

    async def establish(self, origin: Session | None, iq: Element) -> None:
        if origin is not None:
            origin.deliver(iq_result(iq))
