"""XEP-0012 Last Activity: "last seen" for accounts, uptime for the server.

Last activity reveals when someone was online, so it is only told to whoever may
see the account's presence: the account itself or a contact with a subscription
to it (roster subscription ``from``/``both``). Everyone else gets ``forbidden``,
the error XEP-0012 §4 mandates for an unauthorised request (rather than
``service-unavailable``, which would pretend the feature is missing).

The logout time and status are recorded by the presence module when the last
available resource goes away; this module only reads them.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from xmpp_server.errors import Forbidden, ItemNotFound
from xmpp_server.modules.base import Module
from xmpp_server.modules.presence import may_see_presence
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result, qn
from xmpp_server.xml import Element

if TYPE_CHECKING:
    pass

NS_LAST = "jabber:iq:last"


class LastActivity(Module):
    name = "last"
    features = (NS_LAST,)

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "bare", NS_LAST, "query"), self.on_account)
        router.add_iq(IqKey("get", "host", NS_LAST, "query"), self.on_host)

    async def on_host(self, origin: Session | None, iq: Element) -> None:
        uptime = asyncio.get_running_loop().time() - self.host.started_at
        self._reply(origin, iq, uptime)

    async def on_account(self, origin: Session | None, iq: Element) -> None:
        requester, account = iq_addresses(iq)
        if not await may_see_presence(self.host, account, requester):
            raise Forbidden()
        if self.host.router.available(account):
            self._reply(origin, iq, 0)
            return
        last = await self.host.storage.last_activity.get(str(account))
        if last is None:
            raise ItemNotFound()
        logout, status = last
        self._reply(origin, iq, time.time() - logout, status)

    def _reply(self, origin: Session | None, iq: Element, seconds: float, status: str = "") -> None:
        # Clocks can step backwards; a negative idle time would be nonsense on the wire.
        query = Element(qn(NS_LAST, "query"), {"seconds": str(max(0, math.floor(seconds)))})
        if status:
            query.text = status
        if origin is not None:
            origin.deliver(iq_result(iq, query))
