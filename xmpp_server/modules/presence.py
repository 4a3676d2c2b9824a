"""RFC 6121 §3-4: subscriptions (with pre-approval), presence broadcast, probes, directed presence.

Both ends of a subscription are local accounts (there is no federation yet), so a
subscription stanza is processed twice in one pass: first as outbound for the
sender's roster (only when a client sent it), then as inbound for the contact's.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.offline import Offline
from xmpp_server.modules.roster import Roster
from xmpp_server.router import Session
from xmpp_server.stanza import clone, make
from xmpp_server.storage import RosterItem
from xmpp_server.xml import Element, fromstring, tostring

if TYPE_CHECKING:
    from xmpp_server.server import Host

SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
HAS_FROM = ("from", "both")
HAS_TO = ("to", "both")


async def may_see_presence(host: Host, account: JID, requester: JID) -> bool:
    """Whether ``requester`` is entitled to ``account``'s presence (RFC 6121 §4): itself,
    or a contact the account has granted a subscription to."""
    if requester.bare == account.bare:
        return True
    item = await host.storage.rosters.get(str(account.bare), str(requester.bare))
    return item is not None and item.subscription in HAS_FROM


def _priority(stanza: Element) -> int:
    text = stanza.findtext("{jabber:client}priority")
    try:
        value = int(text.strip()) if text else 0
    except ValueError:
        return 0
    return max(-128, min(127, value))


class Presence(Module):
    name = "presence"
    features = ("urn:xmpp:features:pre-approval",)

    def setup(self) -> None:
        router = self.host.router
        router.add_hook("presence/self", self.on_broadcast)
        router.add_hook("presence/bare", self.on_bare)
        router.add_hook("presence/full", self.on_full)
        router.on_unbound(self.on_session_closed)

    @property
    def roster(self) -> Roster:
        module = self.host.modules["roster"]
        assert isinstance(module, Roster)
        return module

    # -- presence without 'to': broadcast (§4.2, §4.4) ----------------------------------

    async def on_broadcast(self, origin: Session | None, stanza: Element, user: JID) -> bool:
        if origin is None:
            return True
        type_ = stanza.get("type")
        if type_ is None:
            initial = not origin.available
            origin.available = True
            origin.priority = _priority(stanza)
            origin.presence = stanza
            if initial:
                await self._initial(origin, stanza)
            else:
                await self._broadcast(origin, stanza)
        elif type_ == "unavailable":
            await self._unavailable(origin, stanza)
        return True

    async def _broadcast(
        self, origin: Session, stanza: Element, roster: list[RosterItem] | None = None
    ) -> None:
        user = origin.jid.bare
        router = self.host.router
        if roster is None:
            roster = await self.host.storage.rosters.items(str(user))
        for item in roster:
            if item.subscription in HAS_FROM:
                out = clone(stanza)
                out.set("to", item.jid)
                await router.deliver(out)
        for session in router.available(user):
            out = clone(stanza)
            out.set("to", str(session.jid))
            session.deliver(out)
        if stanza.get("type") == "unavailable":
            for target in origin.directed:
                out = clone(stanza)
                out.set("to", str(target))
                await router.deliver(out)
            origin.directed.clear()

    async def _initial(self, origin: Session, stanza: Element) -> None:
        """§4.2-4.3: broadcast, probe the contacts we are subscribed to, redeliver pending
        requests, then let the offline queue flush. This runs at every login, so the roster,
        the requests and the queue are read once, together. They are read after
        ``origin.available`` is set: what arrives meanwhile is delivered live, not missed."""
        offline = self.host.modules.get("offline")
        if not isinstance(offline, Offline) or origin.priority < 0:
            offline = None  # no flush will run
        stamp = offline.stamp() if offline is not None else 0
        state = await self.host.storage.initial_presence(
            str(origin.jid.bare), offline=offline is not None
        )
        await self._broadcast(origin, stanza, state.roster)
        for item in state.roster:
            if item.subscription not in HAS_TO:
                continue
            await self._send_current(JID.parse(item.jid), origin.jid)
        for _contact, xml in state.pending:
            origin.deliver(fromstring(xml))
        held: AbstractContextManager[None] = nullcontext()
        if offline is not None:
            held = offline.prefetched(origin, stamp, state.offline)
        with held:
            await self.host.router.session_available(origin)

    async def _unavailable(self, session: Session, stanza: Element) -> None:
        if not session.available:
            return
        session.available = False
        session.presence = None
        user = session.jid.bare
        if not self.host.router.available(user):
            # Before the broadcast: a contact who sees "offline" may ask "since when?" at once.
            status = stanza.findtext("{jabber:client}status") or ""
            await self.host.storage.last_activity.set(str(user), time.time(), status[:1024])
        await self._broadcast(session, stanza)

    async def on_session_closed(self, session: Session) -> None:
        if session.available:
            await self._unavailable(
                session, make("presence", from_=session.jid, type="unavailable")
            )

    # -- presence with 'to' ------------------------------------------------------------

    async def on_full(self, origin: Session | None, stanza: Element, to: JID) -> bool:
        if stanza.get("type") in SUBSCRIPTION_TYPES:
            return await self.on_bare(origin, stanza, to.bare)
        if origin is not None:
            self._track_directed(origin, stanza, to)
        session = self.host.router.session(to)
        if session is not None and stanza.get("type") != "probe":
            session.deliver(stanza)
        return True

    async def on_bare(self, origin: Session | None, stanza: Element, to: JID) -> bool:
        type_ = stanza.get("type")
        sender = JID.parse(stanza.get("from", ""))
        if type_ in SUBSCRIPTION_TYPES:
            stanza.set("from", str(sender.bare))
            stanza.set("to", str(to))
            if origin is not None:
                await self._outbound(sender.bare, to, type_, stanza)
            elif await self.host.router.account_exists(to):
                await self._inbound(sender.bare, to, type_, stanza)
            elif type_ == "subscribe":
                # §3.1.3: no such account; tell the sender the request is refused.
                refusal = make("presence", from_=to, to=sender.bare, type="unsubscribed")
                await self._inbound_refusal(refusal, sender.bare, to)
            return True
        if type_ == "probe":
            await self._probe(sender, to)
            return True
        if type_ in (None, "unavailable"):
            if origin is not None:
                self._track_directed(origin, stanza, to)
            for session in self.host.router.available(to):
                session.deliver(stanza)
        return True

    async def _inbound_refusal(self, refusal: Element, user: JID, contact: JID) -> None:
        if await self.host.router.account_exists(user):
            await self._inbound(contact, user, "unsubscribed", refusal)

    def _track_directed(self, origin: Session, stanza: Element, to: JID) -> None:
        if stanza.get("type") is None:
            origin.directed.add(to)
        elif stanza.get("type") == "unavailable":
            origin.directed.discard(to)

    async def _send_current(self, user: JID, to: JID) -> None:
        """The last presence of each of ``user``'s available resources, to ``to`` (§4.3.2)."""
        for session in self.host.router.available(user):
            if session.presence is not None:
                out = clone(session.presence)
                out.set("from", str(session.jid))
                out.set("to", str(to))
                await self.host.router.deliver(out)

    async def _probe(self, sender: JID, contact: JID) -> None:
        item = await self.host.storage.rosters.get(str(contact), str(sender.bare))
        if item is not None and item.subscription in HAS_FROM:
            await self._send_current(contact, sender)

    # -- subscriptions (§3) -------------------------------------------------------------

    async def _item(self, user: JID, contact: JID) -> RosterItem | None:
        return await self.host.storage.rosters.get(str(user), str(contact))

    async def _outbound(self, user: JID, contact: JID, type_: str, stanza: Element) -> None:
        """The user's side of a subscription stanza it sends; then hand it to the contact."""
        item = await self._item(user, contact)
        storage = self.host.storage
        if type_ == "subscribe":
            if item is None:
                if not await self.host.router.account_exists(contact):
                    # §3.1.3: no such account. Refuse at once, and add no roster item (else
                    # anyone could fill a roster, and the database, with made-up names).
                    refusal = make("presence", from_=contact, to=user, type="unsubscribed")
                    self._to_interested(user, refusal)
                    return
                await self.roster.ensure_room(user)
                await self.roster.put(user, RosterItem(jid=str(contact), ask=True))
            elif item.subscription not in HAS_TO and not item.ask:
                await self.roster.put(user, replace(item, ask=True))
        elif type_ == "unsubscribe":
            if item is not None and (item.subscription in HAS_TO or item.ask):
                sub = {"both": "from", "to": "none"}.get(item.subscription, item.subscription)
                await self.roster.put(user, replace(item, subscription=sub, ask=False))
        elif type_ == "subscribed":
            pending = await storage.subscriptions.remove(str(user), str(contact))
            if pending:
                if item is None:
                    await self.roster.ensure_room(user)
                    item = RosterItem(jid=str(contact))
                sub = {"none": "from", "to": "both"}.get(item.subscription, item.subscription)
                await self.roster.put(user, replace(item, subscription=sub, approved=False))
            elif item is None or item.subscription not in HAS_FROM:
                # §3.4: pre-approval; nothing is sent until the contact asks.
                if item is None:
                    if not await self.host.router.account_exists(contact):
                        return  # nobody there to pre-approve
                    await self.roster.ensure_room(user)
                base = item or RosterItem(jid=str(contact))
                if not base.approved:
                    await self.roster.put(user, replace(base, approved=True))
                return
            else:
                return
        elif type_ == "unsubscribed":
            pending = await storage.subscriptions.remove(str(user), str(contact))
            if item is not None and (item.subscription in HAS_FROM or item.approved):
                sub = {"both": "to", "from": "none"}.get(item.subscription, item.subscription)
                await self.roster.put(user, replace(item, subscription=sub, approved=False))
            elif not pending:
                return
        await self.host.router.deliver(stanza)
        if type_ == "subscribed":
            await self._send_current(user, contact)
        elif type_ == "unsubscribed":
            for session in self.host.router.available(user):
                out = make("presence", from_=session.jid, to=contact, type="unavailable")
                await self.host.router.deliver(out)

    async def _inbound(self, user: JID, contact: JID, type_: str, stanza: Element) -> None:
        """The contact's side: ``user`` sent ``type_`` to local account ``contact``."""
        item = await self._item(contact, user)
        router = self.host.router
        storage = self.host.storage
        if type_ == "subscribe":
            if item is not None and item.subscription in HAS_FROM:
                await router.deliver(make("presence", from_=contact, to=user, type="subscribed"))
                return
            if item is not None and item.approved:
                sub = {"none": "from", "to": "both"}.get(item.subscription, item.subscription)
                await self.roster.put(contact, replace(item, subscription=sub, approved=False))
                await router.deliver(make("presence", from_=contact, to=user, type="subscribed"))
                await self._send_current(contact, user)
                return
            await storage.subscriptions.add(str(contact), str(user), tostring(stanza))
            self._to_interested(contact, stanza)
        elif type_ == "subscribed":
            if item is None or not item.ask:
                return
            sub = {"none": "to", "from": "both"}.get(item.subscription, item.subscription)
            await self.roster.put(contact, replace(item, subscription=sub, ask=False))
            self._to_interested(contact, stanza)
        elif type_ == "unsubscribe":
            pending = await storage.subscriptions.remove(str(contact), str(user))
            if item is not None and item.subscription in HAS_FROM:
                sub = {"both": "to", "from": "none"}.get(item.subscription, item.subscription)
                await self.roster.put(contact, replace(item, subscription=sub))
                self._to_interested(contact, stanza)
                for session in router.available(contact):
                    out = make("presence", from_=session.jid, to=user, type="unavailable")
                    await router.deliver(out)
            elif pending:
                self._to_interested(contact, stanza)
        elif type_ == "unsubscribed":
            if item is None or (item.subscription not in HAS_TO and not item.ask):
                return
            sub = {"both": "from", "to": "none"}.get(item.subscription, item.subscription)
            await self.roster.put(contact, replace(item, subscription=sub, ask=False))
            self._to_interested(contact, stanza)

    def _to_interested(self, user: JID, stanza: Element) -> None:
        for session in self.host.router.available(user):
            session.deliver(stanza)
