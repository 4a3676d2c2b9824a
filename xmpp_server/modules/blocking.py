"""XEP-0191 Blocking Command: a user's list of JIDs that may not reach them or be reached.

Blocking is enforced by two router filters that run on every stanza between
accounts, so each user's list is cached in memory (least recently used first out)
and reloaded after every change. Inbound stanzas from a blocked JID are dropped
without a word, except iq get/set, which get ``service-unavailable``: the blocked
party cannot tell a block from being offline (XEP-0191 §3.3 says messages SHOULD
bounce too, but with offline storage an offline user never bounces, so a bounce
would give the block away). The user's own stanzas to a blocked JID bounce with
``not-acceptable`` and ``<blocked xmlns='urn:xmpp:blocking:errors'/>``.

Only contacts entitled to the user's presence are told about a (un)block through
presence, so blocking does not reveal to a stranger that the user is online.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from xmpp_server.errors import BadRequest, Forbidden, JidMalformed, ServiceUnavailable, StanzaError
from xmpp_server.jid import JID, parse_valid
from xmpp_server.modules.base import Module
from xmpp_server.modules.presence import HAS_FROM
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import (
    IQ,
    PRESENCE,
    clone,
    iq_addresses,
    iq_result,
    make,
    new_id,
    payload,
    qn,
)
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.server import Host

NS_BLOCKING = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
CACHE_SIZE = 10000  # users whose blocklist is kept in memory


class Blocked(StanzaError):
    """XEP-0191 §3.3: the user tried to reach a JID they blocked.

    ``extra`` holds the application-specific condition, which ``error_reply`` must
    append to ``<error/>`` after the defined condition and text (RFC 6120 §8.3.2).
    """

    condition = "not-acceptable"

    def __init__(self) -> None:
        super().__init__(type="cancel")  # retrying cannot help until the user unblocks
        self.extra: list[Element] = [Element(qn(NS_BLOCKING_ERRORS, "blocked"))]


def _domains(domain: str) -> Iterator[str]:
    """The domain and its parents: blocking a domain blocks its subdomains too."""
    yield domain
    if domain.startswith("[") or domain.replace(".", "").isdigit():
        return  # an IP literal has no parents
    rest = domain
    while "." in rest:
        rest = rest.partition(".")[2]
        yield rest


def _candidates(jid: JID) -> Iterator[JID]:
    """The list items that would block ``jid`` (XEP-0191 §4 matching order)."""
    yield jid
    if jid.local is not None and jid.resource is not None:
        yield jid.bare
    for domain in _domains(jid.domain):
        yield JID(None, domain)


def is_blocked(blocklist: frozenset[JID], jid: JID) -> bool:
    return bool(blocklist) and any(c in blocklist for c in _candidates(jid))


def _targets(changed: frozenset[JID], unchanged: frozenset[JID], jid: JID) -> set[JID]:
    """Where to send presence when ``changed`` items were (un)blocked and ``unchanged``
    stay blocked: ``jid`` itself, or the blocked full JIDs of the contact ``jid``."""
    if is_blocked(changed, jid):
        return set() if is_blocked(unchanged, jid) else {jid}
    if jid.local is None or jid.resource is not None:
        return set()
    return {
        item
        for item in changed
        if item.resource is not None and item.bare == jid and not is_blocked(unchanged, item)
    }


def _items(command: Element) -> list[JID]:
    jids: list[JID] = []
    for item in command.findall(qn(NS_BLOCKING, "item")):
        text = item.get("jid")
        if not text:
            raise BadRequest("an item without a jid")
        try:
            jids.append(JID.parse(text))
        except ValueError as exc:
            raise JidMalformed(str(exc)) from None
    return list(dict.fromkeys(jids))


def _command(tag: str, jids: Iterable[JID]) -> Element:
    el = Element(qn(NS_BLOCKING, tag))
    for jid in jids:
        ET.SubElement(el, qn(NS_BLOCKING, "item"), {"jid": str(jid)})
    return el


class Blocking(Module):
    name = "blocking"
    features = (NS_BLOCKING,)

    def __init__(self, host: Host, options: Any) -> None:
        super().__init__(host, options)
        self._cache: OrderedDict[JID, frozenset[JID]] = OrderedDict()
        self._epoch = 0  # bumped on every change so a load racing a change is not cached
        self._requested: dict[JID, set[JID]] = {}  # bare → full JIDs that fetched the list
        self._server = JID(None, host.domain)
        # Who has blocked anyone at all, loaded at start: the others' (empty) lists need no
        # query, so the first message of a session costs no round-trip. Only this module
        # adds to blocklists; a stale member just costs one lookup.
        self._with_lists: set[JID] | None = None

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("get", "bare", NS_BLOCKING, "blocklist"), self.on_get)
        router.add_iq(IqKey("set", "bare", NS_BLOCKING, "block"), self.on_block)
        router.add_iq(IqKey("set", "bare", NS_BLOCKING, "unblock"), self.on_unblock)
        router.add_filter("in", self.filter_in)
        router.add_filter("out", self.filter_out)
        router.on_unbound(self._session_closed)

    async def start(self) -> None:
        self._with_lists = parse_valid(await self.host.storage.blocklist.owners())

    # -- the list ---------------------------------------------------------------------

    async def blocklist(self, user: JID) -> frozenset[JID]:
        cached = self._cache.get(user)
        if cached is not None:
            self._cache.move_to_end(user)
            return cached
        if self._with_lists is not None and user not in self._with_lists:
            return frozenset()
        epoch = self._epoch
        jids: list[JID] = []
        for text in await self.host.storage.blocklist.get(str(user)):
            try:
                jids.append(JID.parse(text))
            except ValueError:
                continue  # written by something that did not validate; cannot match anyway
        loaded = frozenset(jids)
        if epoch == self._epoch:
            self._cache[user] = loaded
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return loaded

    def forget(self, user: JID) -> None:
        """Drop what is known about ``user`` (their account was deleted or recreated)."""
        self._epoch += 1
        self._cache.pop(user, None)
        self._requested.pop(user, None)

    def _changed(self, user: JID) -> None:
        self._epoch += 1
        self._cache.pop(user, None)

    async def _session_closed(self, session: Session) -> None:
        if self.host.router.session(session.jid) is not None:
            return  # a new session took this resource over; its request stands
        bare = session.jid.bare
        requested = self._requested.get(bare)
        if requested is not None:
            requested.discard(session.jid)
            if not requested:
                del self._requested[bare]

    # -- filters ----------------------------------------------------------------------

    def _local_user(self, jid: JID) -> bool:
        return jid.local is not None and jid.domain == self.host.domain

    async def filter_in(self, stanza: Element, sender: JID, to: JID) -> StanzaError | bool:
        if sender.bare == to.bare or sender == self._server or not self._local_user(to):
            return False
        if not is_blocked(await self.blocklist(to.bare), sender):
            return False
        if stanza.tag == IQ and stanza.get("type") in ("get", "set"):
            return ServiceUnavailable()
        return True

    async def filter_out(self, stanza: Element, sender: JID, to: JID) -> StanzaError | bool:
        if sender.bare == to.bare or not self._local_user(sender):
            return False
        if not is_blocked(await self.blocklist(sender.bare), to):
            return False
        if stanza.tag == PRESENCE:
            return True
        return Blocked()  # never sent for errors and results: the router answers neither

    # -- commands ---------------------------------------------------------------------

    def _own(self, origin: Session | None, iq: Element) -> tuple[Session, JID]:
        requester, account = iq_addresses(iq)
        if origin is None or requester.bare != account:
            raise Forbidden("you can only manage your own blocklist")
        return origin, account

    async def on_get(self, origin: Session | None, iq: Element) -> None:
        session, user = self._own(origin, iq)
        blocked = await self.blocklist(user)
        self._requested.setdefault(user, set()).add(session.jid)
        session.deliver(iq_result(iq, _command("blocklist", sorted(blocked, key=str))))

    async def on_block(self, origin: Session | None, iq: Element) -> None:
        session, user = self._own(origin, iq)
        command = payload(iq)
        assert command is not None
        jids = _items(command)
        if not jids:
            raise BadRequest("nothing to block")
        before = await self.blocklist(user)
        # Sent while the block is not yet in force, so the router's filters let it pass.
        for source, target in await self._affected(user, frozenset(jids), before):
            await self.host.router.deliver(
                make("presence", from_=source.jid, to=target, type="unavailable")
            )
        if self._with_lists is not None:
            self._with_lists.add(user)  # before the write: a racing load must query
        await self.host.storage.blocklist.add(str(user), [str(jid) for jid in jids])
        self._changed(user)
        session.deliver(iq_result(iq))
        self._push(user, "block", jids)

    async def on_unblock(self, origin: Session | None, iq: Element) -> None:
        session, user = self._own(origin, iq)
        command = payload(iq)
        assert command is not None
        jids = _items(command)
        before = await self.blocklist(user)
        storage = self.host.storage.blocklist
        if jids:
            await storage.remove(str(user), [str(jid) for jid in jids])
        else:
            await storage.clear(str(user))
        self._changed(user)
        session.deliver(iq_result(iq))
        self._push(user, "unblock", jids)
        removed = frozenset(jids) & before if jids else before
        after = await self.blocklist(user)
        for source, target in await self._affected(user, removed, after):
            if source.presence is not None:
                current = clone(source.presence)
                current.set("from", str(source.jid))
                current.set("to", str(target))
                await self.host.router.deliver(current)

    def _push(self, user: JID, tag: str, jids: list[JID]) -> None:
        for full in list(self._requested.get(user, ())):
            session = self.host.router.session(full)
            if session is None:
                continue
            push = make("iq", to=full, type="set", id=new_id())
            push.append(_command(tag, jids))
            session.deliver(push)

    async def _affected(
        self, user: JID, changed: frozenset[JID], unchanged: frozenset[JID]
    ) -> list[tuple[Session, JID]]:
        """(resource, contact) pairs whose presence visibility the change flips: contacts
        subscribed to the user, and JIDs a resource sent directed presence to."""
        sessions = self.host.router.available(user)
        if not sessions or not changed:
            return []
        subscribed: set[JID] = set()
        for item in await self.host.storage.rosters.items(str(user)):
            if item.subscription not in HAS_FROM:
                continue
            try:
                contact = JID.parse(item.jid)
            except ValueError:
                continue
            subscribed |= _targets(changed, unchanged, contact)
        pairs = [
            (session, target) for session in sessions for target in sorted(subscribed, key=str)
        ]
        for session in sessions:
            directed: set[JID] = set()
            for jid in session.directed:
                directed |= _targets(changed, unchanged, jid)
            pairs.extend((session, target) for target in sorted(directed - subscribed, key=str))
        return pairs
