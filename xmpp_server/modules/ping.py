"""XEP-0199 XMPP Ping: the server answers pings to itself and to accounts' bare JIDs.

A ping to a bare JID is answered by the server on the account's behalf (RFC 6121
§8.5.1), but only to the account itself and to contacts entitled to its presence:
to anyone else a reply would confirm that the account exists, so they get the
same ``service-unavailable`` as a ping to an account that does not.
"""

from __future__ import annotations

from xmpp_server.errors import ServiceUnavailable
from xmpp_server.modules.base import Module
from xmpp_server.modules.presence import may_see_presence
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result
from xmpp_server.xml import Element

NS_PING = "urn:xmpp:ping"


class Ping(Module):
    name = "ping"
    features = (NS_PING,)

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "host", NS_PING, "ping"), self.on_host)
        router.add_iq(IqKey("get", "bare", NS_PING, "ping"), self.on_account)

    async def on_host(self, origin: Session | None, iq: Element) -> None:
        if origin is not None:
            origin.deliver(iq_result(iq))

    async def on_account(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        if not await may_see_presence(self.host, account, requester):
            raise ServiceUnavailable()
        if origin is not None:
            origin.deliver(iq_result(iq))
