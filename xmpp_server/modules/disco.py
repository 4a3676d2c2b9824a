"""XEP-0030 Service Discovery on the server and (on their behalf) on accounts."""

from __future__ import annotations

from xmpp_server.errors import ItemNotFound, ServiceUnavailable
from xmpp_server.modules.base import Module
from xmpp_server.modules.presence import may_see_presence
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result, qn
from xmpp_server.xml import Element

NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"


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
        # Identities and XEP-0128 forms that modules add via ``disco_info()`` (upload: §2).
        for module in self.host.modules.values():
            extra = getattr(module, "disco_info", None)
            query.extend(extra() if extra is not None else ())
        self._reply(origin, iq, query)

    async def host_items(self, origin: Session | None, iq: Element) -> None:
        """Services on subdomains (the MUC service) that modules offer via ``disco_items()``."""
        query = self._query(iq, NS_ITEMS)
        for module in self.host.modules.values():
            items = getattr(module, "disco_items", None)
            for jid, name in items() if items is not None else ():
                query.append(Element(qn(NS_ITEMS, "item"), {"jid": jid, "name": name}))
            # Pubsub nodes on the server's JID (the server's sticker packs), as attributes.
            nodes = getattr(module, "disco_nodes", None)
            for attrs in nodes() if nodes is not None else ():
                query.append(Element(qn(NS_ITEMS, "item"), attrs))
        self._reply(origin, iq, query)

    async def _may_see(self, iq: Element) -> None:
        """Account disco is for the account itself and for contacts subscribed to it."""
        requester, account = iq_addresses(iq)
        if not await may_see_presence(self.host, account, requester):
            raise ServiceUnavailable()

    async def account_info(self, origin: Session | None, iq: Element) -> None:
        await self._may_see(iq)
        query = self._query(iq, NS_INFO)
        query.append(
            Element(qn(NS_INFO, "identity"), {"category": "account", "type": "registered"})
        )
        for module in self.host.modules.values():
            for identity in getattr(module, "account_identities", ()):
                query.append(Element(qn(NS_INFO, "identity"), identity))
        for feature in self._features("account_features"):
            query.append(Element(qn(NS_INFO, "feature"), {"var": feature}))
        self._reply(origin, iq, query)

    async def account_items(self, origin: Session | None, iq: Element) -> None:
        """What modules list on an account (its PEP nodes) via ``account_disco_items()``."""
        await self._may_see(iq)
        query = self._query(iq, NS_ITEMS)
        requester, account = iq_addresses(iq)
        for module in self.host.modules.values():
            items = getattr(module, "account_disco_items", None)
            for attrs in await items(account, requester) if items is not None else ():
                query.append(Element(qn(NS_ITEMS, "item"), attrs))
        self._reply(origin, iq, query)

    def _reply(self, origin: Session | None, iq: Element, query: Element) -> None:
        if origin is not None:
            origin.deliver(iq_result(iq, query))
