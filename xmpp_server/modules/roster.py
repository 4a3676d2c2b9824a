"""RFC 6121 §2 roster management, with roster versioning (§2.6) and pushes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from xmpp_server.errors import BadRequest, Forbidden, NotAcceptable, NotAllowed
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_result, make, new_id, qn
from xmpp_server.storage import RosterItem
from xmpp_server.xml import Element

NS_ROSTER = "jabber:iq:roster"
MAX_NAME = 1024
MAX_GROUPS = 32


@dataclass(frozen=True)
class RosterOptions:
    max_items: int = field(default=1000, metadata={"min": 1})
    """Contacts one roster may hold: every item costs storage and work at each login and
    presence broadcast. Adding one more is refused with ``not-allowed``."""


def item_element(item: RosterItem) -> Element:
    el = Element(qn(NS_ROSTER, "item"), {"jid": item.jid, "subscription": item.subscription})
    if item.name:
        el.set("name", item.name)
    if item.ask:
        el.set("ask", "subscribe")
    if item.approved:
        el.set("approved", "true")
    for group in item.groups:
        ET.SubElement(el, qn(NS_ROSTER, "group")).text = group
    return el


def own_account(origin: Session | None, iq: Element) -> JID:
    """The account an iq to 'no to / own bare JID' concerns; others may not touch it."""
    if origin is None:
        raise Forbidden()
    to = iq.get("to")
    if to and JID.parse(to) != origin.jid.bare:
        raise Forbidden("you can only manage your own roster")
    return origin.jid.bare


class Roster(Module):
    """Rosters: get, set, remove; every change is pushed to the user's interested resources."""

    name = "roster"
    options_class = RosterOptions
    account_features = ()

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "bare", NS_ROSTER, "query"), self.get)
        router.add_iq(IqKey("set", "bare", NS_ROSTER, "query"), self.set)

    async def get(self, origin: Session | None, iq: Element) -> None:
        user = own_account(origin, iq)
        assert origin is not None
        query = iq.find(qn(NS_ROSTER, "query"))
        assert query is not None
        origin.interested = True  # before the read: a change committed meanwhile is pushed
        version, items = await self.host.storage.rosters.snapshot(str(user), query.get("ver"))
        if items is None:
            origin.deliver(iq_result(iq))  # §2.6.3: nothing changed, pushes will follow
            return
        result = Element(qn(NS_ROSTER, "query"), {"ver": str(version)})
        result.extend(item_element(item) for item in items)
        origin.deliver(iq_result(iq, result))

    async def set(self, origin: Session | None, iq: Element) -> None:
        user = own_account(origin, iq)
        assert origin is not None
        query = iq.find(qn(NS_ROSTER, "query"))
        assert query is not None
        items = query.findall(qn(NS_ROSTER, "item"))
        if len(items) != 1:
            raise BadRequest("a roster set must contain exactly one item")
        el = items[0]
        try:
            contact = JID.parse(el.get("jid", ""))
        except ValueError as exc:
            raise BadRequest(f"invalid item JID: {exc}") from None
        if contact.resource is not None:
            raise BadRequest("roster items are bare JIDs")
        if contact == user:
            raise NotAllowed("you cannot add yourself to your roster")
        if el.get("subscription") == "remove":
            await self.remove_contact(user, contact)
            origin.deliver(iq_result(iq))
            return
        if el.get("ask") is not None:
            raise BadRequest("clients may not set 'ask'")
        name = el.get("name") or None
        if name is not None and len(name) > MAX_NAME:
            raise NotAcceptable("item name too long")
        groups = [(g.text or "").strip() for g in el.findall(qn(NS_ROSTER, "group"))]
        if any(not g for g in groups):
            raise NotAcceptable("empty group name")
        if len(set(groups)) != len(groups):
            raise BadRequest("Duplicated groups are not allowed by RFC 6121")
        if len(groups) > MAX_GROUPS or any(len(g) > MAX_NAME for g in groups):
            raise NotAcceptable("too many or too long groups")
        old = await self.host.storage.rosters.get(str(user), str(contact))
        if old is None:
            await self.ensure_room(user)
        item = RosterItem(
            jid=str(contact),
            name=name,
            subscription=old.subscription if old else "none",
            ask=old.ask if old else False,
            approved=old.approved if old else False,
            groups=tuple(groups),
        )
        await self.put(user, item)
        origin.deliver(iq_result(iq))

    async def ensure_room(self, user: JID) -> None:
        """Raise unless ``user``'s roster can take one more item (RFC 6121 §2.3.3)."""
        limit = self.options.max_items
        if await self.host.storage.rosters.count(str(user)) >= limit:
            raise NotAllowed(f"the roster is full ({limit} contacts)")

    async def put(self, user: JID, item: RosterItem) -> None:
        version = await self.host.storage.rosters.put(str(user), item)
        self.push(user, item_element(item), version)

    async def remove_contact(self, user: JID, contact: JID) -> None:
        """§2.5: removing an item cancels the subscriptions both ways."""
        storage = self.host.storage
        old = await storage.rosters.get(str(user), str(contact))
        had_pending = await storage.subscriptions.remove(str(user), str(contact))
        if old is None:
            if had_pending:
                await self._presence(user, contact, "unsubscribed")
            return
        version = await storage.rosters.remove(str(user), str(contact))
        if version is not None:
            removed = Element(
                qn(NS_ROSTER, "item"), {"jid": str(contact), "subscription": "remove"}
            )
            self.push(user, removed, version)
        if old.subscription in ("to", "both") or old.ask:
            await self._presence(user, contact, "unsubscribe")
        if old.subscription in ("from", "both") or had_pending:
            await self._presence(user, contact, "unsubscribed")

    async def _presence(self, user: JID, contact: JID, type_: str) -> None:
        await self.host.router.deliver(make("presence", to=contact, from_=user, type=type_))

    def push(self, user: JID, item: Element, version: int) -> None:
        for session in self.host.router.resources(user):
            if session.interested:
                query = Element(qn(NS_ROSTER, "query"), {"ver": str(version)})
                query.append(item)
                push = make("iq", to=session.jid, from_=user, type="set", id=new_id())
                push.append(query)
                session.deliver(push)
