"""XEP-0030 Service Discovery on the server and (on their behalf) on accounts."""

from __future__ import annotations

from xmpp_server.errors import ItemNotFound, ServiceUnavailable
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, qn
from xmpp_server.xml import Element

NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"
HAS_FROM = ("from", "both")


class Disco(Module):
    name = "disco"
    features = (NS_INFO, NS_ITEMS)
    account_features = (NS_INFO, NS_ITEMS)

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "host", NS_INFO, "query"), self.host_info)
        router.add_iq(IqKey("get", "host", NS_ITEMS, "query"), self.host_items)
        router.add_iq(IqKey("get", "bare", NS_INFO, "query"), self.account_info)
        router.add_iq(IqKey("get", "bare", NS_ITEMS, "query"), self.account_items)

    def _features(self, attr: str) -> list[str]:
        found: set[str] = set()
        for module in self.host.modules.values():
            found.update(getattr(module, attr))
        return sorted(found)

    def _query(self, iq: Element, ns: str) -> Element:
        request = iq.find(qn(ns, "query"))
        result = Element(qn(ns, "query"))
        if request is not None and request.get("node"):
            raise ItemNotFound("no such node")
        return result

    async def host_info(self, origin: Session | None, iq: Element) -> None:
        query = self._query(iq, NS_INFO)
        identity = {"category": "server", "type": "im", "name": self.host.config.server.name}
        query.append(Element(qn(NS_INFO, "identity"), identity))
        for feature in self._features("features"):
            query.append(Element(qn(NS_INFO, "feature"), {"var": feature}))
        self._reply(origin, iq, query)

    async def host_items(self, origin: Session | None, iq: Element) -> None:
        self._reply(origin, iq, self._query(iq, NS_ITEMS))

    async def _may_see(self, origin: Session | None, iq: Element) -> JID:
        """Account disco is for the account itself and for contacts subscribed to it."""
        to = iq.get("to")
        requester = JID.parse(iq.get("from", ""))
        account = JID.parse(to) if to else requester.bare
        if requester.bare != account:
            item = await self.host.storage.rosters.get(str(account), str(requester.bare))
            if item is None or item.subscription not in HAS_FROM:
                raise ServiceUnavailable()
        return account

    async def account_info(self, origin: Session | None, iq: Element) -> None:
        await self._may_see(origin, iq)
        query = self._query(iq, NS_INFO)
        query.append(
            Element(qn(NS_INFO, "identity"), {"category": "account", "type": "registered"})
        )
        for feature in self._features("account_features"):
            query.append(Element(qn(NS_INFO, "feature"), {"var": feature}))
        self._reply(origin, iq, query)

    async def account_items(self, origin: Session | None, iq: Element) -> None:
        await self._may_see(origin, iq)
        self._reply(origin, iq, self._query(iq, NS_ITEMS))

    def _reply(self, origin: Session | None, iq: Element, query: Element) -> None:
        if origin is not None:
            origin.deliver(iq_result(iq, query))
