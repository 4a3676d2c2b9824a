"""XEP-0045 Multi-User Chat at ``conference.<domain>``: the asyncio shell around
:mod:`.room`, with XEP-0249 direct invitations, XEP-0313 room archives and XEP-0410
self-ping.

Everything a room sends goes through that room's outbox, delivered in order by one task per
busy room, a few hundred stanzas per event-loop pass: a message to 1,000 occupants never
stalls other clients, and no occupant sees two broadcasts in a different order than another.
Occupants on this server are written to directly (their sessions are in the router's table);
a session that has gone counts as the occupant leaving.

Persistent rooms, their configuration, subject and affiliations live in storage; temporary
rooms only in memory, until their last occupant leaves. A room in memory is the truth while
it is loaded: changes are applied to it first, then written.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import SQLAlchemyError

from xmpp_server.control import CommandHandler
from xmpp_server.errors import (
    BadRequest,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    ServiceUnavailable,
    StanzaError,
)
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.muc import forms
from xmpp_server.modules.muc.room import (
    AFFILIATION_CHANGED,
    AFFILIATION_RANK,
    BANNED,
    CONFIG_CHANGED,
    CREATED,
    KICKED,
    LOGGED,
    MEMBERS_ONLY_NOW,
    NICK_CHANGED,
    NON_ANONYMOUS,
    NS_ADMIN,
    NS_DELAY,
    NS_MUC,
    NS_OWNER,
    NS_USER,
    SELF,
    NotAcceptableRole,
    Occupant,
    Room,
    RoomConfig,
    history_request,
    occupant_presence,
    role_for,
    user_x,
)
from xmpp_server.modules.stanza_id import NS_SID, STANZA_ID, new_stanza_id
from xmpp_server.router import Session
from xmpp_server.stanza import clone, iq_result, make, payload, qn
from xmpp_server.storage import Affiliation as StoredAffiliation
from xmpp_server.storage import Rooms
from xmpp_server.xml import NS_CLIENT, Element, escape_attr, tobytes

if TYPE_CHECKING:
    from xmpp_server.modules.mam import Mam
    from xmpp_server.server import Host

log = logging.getLogger("natterd.muc")

NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"
NS_PING = "urn:xmpp:ping"
NS_MAM = "urn:xmpp:mam:2"
NS_CONFERENCE = "jabber:x:conference"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
BATCH = 256  # deliveries per event-loop pass while fanning out
BODY = qn(NS_CLIENT, "body")
SUBJECT = qn(NS_CLIENT, "subject")
_ARCHIVED = frozenset(
    {
        BODY,
        qn("urn:xmpp:chat-markers:0", "displayed"),
        qn("urn:xmpp:chat-markers:0", "received"),
        qn("urn:xmpp:receipts", "received"),
        qn("urn:xmpp:message-correct:0", "replace"),
        qn("eu.siacs.conversations.axolotl", "encrypted"),
        qn("urn:xmpp:omemo:2", "encrypted"),
    }
)


@dataclass(frozen=True)
class MucOptions:
    host: str = ""
    """The service's domain; empty: ``conference.`` and the server's domain."""
    history_size: int = field(default=20, metadata={"min": 0, "max": 1000})
    """Messages a room keeps in memory for occupants who join (XEP-0045 §7.2.15)."""
    max_occupants: int = field(default=5000, metadata={"min": 1})
    """Most occupants any room may have; rooms choose a limit up to this."""
    admins: list[str] = field(default_factory=list)
    """Bare JIDs that own every room and may always create rooms."""
    restrict_creation: bool = False
    """Only ``admins`` may create rooms."""
    default_persistent: bool = False
    """New rooms are kept when empty (WhatsApp-style groups: set true)."""
    default_public: bool = True
    """New rooms are listed in disco#items of the service."""
    default_members_only: bool = False
    """New rooms admit members only."""
    default_whois: Literal["moderators", "anyone"] = "moderators"
    """Who sees occupants' real JIDs in new rooms."""
    max_rooms_per_user: int = field(default=100, metadata={"min": 0})
    """Rooms one user may own, live in memory or stored (``admins`` are exempt); creating
    one more is refused with ``not-allowed``. 0 means unlimited."""


def service_domain(host: str, server_domain: str) -> str:
    """The MUC service's domain: ``[modules.muc] host``, or ``conference.`` and the server's
    domain when it is empty (natterctl computes it the same way)."""
    return JID.parse(host or f"conference.{server_domain}").domain


def default_config(options: MucOptions) -> RoomConfig:
    """A new room's configuration under the service's defaults."""
    return RoomConfig(
        persistent=options.default_persistent,
        public=options.default_public,
        members_only=options.default_members_only,
        whois=options.default_whois,
        max_occupants=min(1000, options.max_occupants),
    )


async def load_room(storage: Rooms, jid: JID, history_size: int = 0) -> Room | None:
    """A stored room's state (configuration, subject, affiliations), without occupants."""
    stored = await storage.get(str(jid))
    if stored is None:
        return None
    room = Room(jid, RoomConfig.from_dict(stored.config), history_size=history_size)
    room.stored = True
    room.subject = stored.subject or ""
    room.subject_by = stored.subject_by
    for item in await storage.affiliations(str(jid)):
        member = JID.parse(item.jid)
        room.affiliations[member] = item.affiliation  # type: ignore[assignment]
        if item.reason:
            room.reasons[member] = item.reason
    return room


@dataclass
class _Outbox:
    """A room's stanzas to deliver, in order: (stanza, recipient sessions or None to route)."""

    items: deque[tuple[Element, list[JID] | None, bytes | None]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class Muc(Module):
    name = "muc"
    options_class = MucOptions

    def __init__(self, host: Host, options: Any) -> None:
        super().__init__(host, options)
        self.domain = service_domain(options.host, host.domain)
        self.admins = {JID.parse(text).bare for text in options.admins}
        self.rooms: dict[JID, Room] = {}
        self._loading: dict[JID, asyncio.Future[Room | None]] = {}
        self._outboxes: dict[JID, _Outbox] = {}
        self._purges: dict[JID, asyncio.Task[None]] = {}
        # Purges run one at a time: 2,000 rooms gone at once (one user leaving them all) ran
        # 2,000 concurrent deletes and left natterd 35 MB larger for good.
        self._purge_slot = asyncio.Semaphore(1)

    # -- set-up -----------------------------------------------------------------------

    def setup(self) -> None:
        router = self.host.router
        router.add_domain(self.domain, self.on_stanza)
        router.on_unbound(self.on_session_closed)
        # XEP-0249: a direct invitation to a members-only room makes the invitee a member.
        router.add_hook("message/sent", self.on_direct_invite, priority=10)

    def disco_items(self) -> list[tuple[str, str]]:
        """Items on the server's disco#items: this service."""
        return [(self.domain, "Group chats")]

    @property
    def mam(self) -> Mam | None:
        module = self.host.modules.get("mam")
        return module if module is not None else None  # type: ignore[return-value]

    async def stop(self) -> None:
        for outbox in list(self._outboxes.values()):
            if outbox.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await outbox.task

    # -- loading and storing rooms --------------------------------------------------------

    def default_config(self) -> RoomConfig:
        return default_config(self.options)

    async def room(self, jid: JID) -> Room | None:
        """The room in memory, loaded from storage on first use."""
        room = self.rooms.get(jid)
        if room is not None:
            return room
        pending = self._loading.get(jid)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Room | None] = asyncio.get_running_loop().create_future()
        self._loading[jid] = future
        try:
            room = await self._load(jid)
            if room is not None:
                self.rooms[jid] = room
            future.set_result(room)
            return room
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody logs it twice
            raise
        finally:
            del self._loading[jid]

    async def _load(self, jid: JID) -> Room | None:
        storage = self.host.storage
        room = await load_room(storage.rooms, jid, self.options.history_size)
        mam = self.mam
        if room is not None and room.config.archive and room.history_size and mam is not None:
            # Joiners get recent history even right after a restart (an unreadable archived
            # row is set aside, not a reason to fail the join).
            page, stored = await mam.read_page(str(jid), before="", limit=room.history_size)
            for item, message in zip(page.items, stored, strict=True):
                if message.find(BODY) is not None:
                    room.remember(item.timestamp, message, len(message.findtext(BODY) or ""))
        return room

    async def _save(self, room: Room) -> None:
        """Write a persistent room (config, subject, affiliations); forget a temporary one."""
        storage = self.host.storage.rooms
        try:
            if room.config.persistent:
                await storage.save_config(str(room.jid), room.config.to_dict())
                if not room.stored:
                    room.stored = True
                    await storage.set_affiliations(
                        str(room.jid),
                        [
                            StoredAffiliation(str(jid), aff, reason=room.reasons.get(jid))
                            for jid, aff in room.affiliations.items()
                        ],
                    )
                    if room.subject:
                        await storage.set_subject(str(room.jid), room.subject, room.subject_by)
            elif room.stored:
                await storage.delete(str(room.jid))
                room.stored = False
        except SQLAlchemyError:
            log.exception("could not store room %s", room.jid)
            raise

    async def _store_affiliation(self, room: Room, jid: JID, affiliation: str) -> None:
        if room.stored:
            item = StoredAffiliation(str(jid), affiliation, reason=room.reasons.get(jid))
            await self.host.storage.rooms.set_affiliation(str(room.jid), item)

    def _unload_if_idle(self, room: Room) -> None:
        if room.occupants:
            return
        if self.rooms.get(room.jid) is room:
            del self.rooms[room.jid]
        if not room.config.persistent or room.locked:
            log.info("room %s is gone: temporary and empty", room.jid)
            self._forget_archive(room)

    # -- output -----------------------------------------------------------------------

    def _send(
        self,
        room: Room,
        stanza: Element,
        to: Iterable[JID] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Queue ``stanza`` for occupant sessions ``to`` (each gets its own ``to``), or, with
        ``to`` None, for the router (``to`` already set: invitations, private messages).
        ``data``: the stanza serialized without ``to``, when that is known already."""
        outbox = self._outboxes.get(room.jid)
        if outbox is None:
            outbox = self._outboxes[room.jid] = _Outbox()
        outbox.items.append((stanza, list(to) if to is not None else None, data))
        if outbox.task is None:
            outbox.task = asyncio.create_task(self._drain(room.jid, outbox), name="muc-fanout")

    async def _drain(self, jid: JID, outbox: _Outbox) -> None:
        router = self.host.router
        sent = 0
        gone: list[JID] = []
        try:
            while outbox.items:
                stanza, targets, data = outbox.items.popleft()
                if targets is None:
                    await router.deliver(stanza)
                    sent += 1
                    continue
                # Serialized once; each recipient's copy differs only in 'to', spliced in.
                if data is None:
                    stanza.attrib.pop("to", None)
                    data = tobytes(stanza)
                head = 1 + len(stanza.tag.rpartition("}")[2])  # after "<message"
                for target in targets:
                    session = router.session(target) if target.domain == self.host.domain else None
                    if session is None:
                        gone.append(target)
                        continue
                    to = str(target)
                    out = copy.copy(stanza)
                    out.attrib = dict(stanza.attrib)
                    out.set("to", to)
                    spliced = b'%s to="%s"%s' % (data[:head], escape_attr(to).encode(), data[head:])
                    session.deliver(out, data=spliced)
                    sent += 1
                    if sent >= BATCH:
                        sent = 0
                        await asyncio.sleep(0)
                if sent >= BATCH:
                    sent = 0
                    await asyncio.sleep(0)
        except Exception:
            log.exception("fan-out of room %s failed", jid)
        finally:
            outbox.task = None
            if outbox.items:
                outbox.task = asyncio.create_task(self._drain(jid, outbox), name="muc-fanout")
            elif self._outboxes.get(jid) is outbox:
                del self._outboxes[jid]
        for target in gone:
            room = self.rooms.get(jid)
            if room is not None and target in room.nicks:
                self._leave(room, target, None)

    def _broadcast_presence(
        self,
        room: Room,
        occupant: Occupant,
        *,
        codes: tuple[str, ...] = (),
        unavailable: bool = False,
        self_codes: tuple[str, ...] = (),
        skip: JID | None = None,
        extra: Element | None = None,
        **item: Any,
    ) -> None:
        """The occupant's presence to everyone in the room; its own sessions get ``SELF``."""
        occupant.rendered.clear()  # whatever changed, what joiners are sent changes too
        base = occupant_presence(room, occupant, unavailable=unavailable)
        plain: list[JID] = []
        with_jid: list[JID] = []
        own: list[JID] = []
        for session, nick in room.nicks.items():
            if session == skip:
                continue
            if nick == occupant.nick:
                own.append(session)
            elif room.shows_jid_to(room.occupants.get(nick)):
                with_jid.append(session)
            else:
                plain.append(session)
        # Sessions that just left are no longer in room.nicks but still get their own copy.
        if unavailable:
            own.extend(s for s in occupant.sessions if s not in own and s != skip)
        real = next(iter(occupant.sessions), None)
        for targets, show, status in (
            (plain, False, codes),
            (with_jid, True, codes),
            (own, True, codes + self_codes + (SELF,)),
        ):
            if not targets:
                continue
            stanza = clone(base)
            x = user_x(occupant, jid=real if show else None, codes=status, **item)
            if extra is not None:
                x.append(extra)
            stanza.append(x)
            self._send(room, stanza, targets)

    def _presence_for(
        self, room: Room, occupant: Occupant, viewer: Occupant | None
    ) -> tuple[Element, bytes]:
        """The occupant's current presence as ``viewer`` sees it, built once per change: a
        room of N fills with N² of these."""
        show = room.shows_jid_to(viewer)
        cached = occupant.rendered.get(show)
        if cached is None:
            stanza = occupant_presence(room, occupant)
            real = next(iter(occupant.sessions), None)
            stanza.append(user_x(occupant, jid=real if show else None))
            cached = occupant.rendered[show] = (stanza, tobytes(stanza))
        return cached

    # -- entry point ------------------------------------------------------------------

    async def on_stanza(self, origin: Session | None, stanza: Element, to: JID) -> None:
        sender = JID.parse(stanza.get("from") or self.host.domain)
        kind = stanza.tag.rpartition("}")[2]
        if to.local is None:
            if kind == "iq":
                await self._service_iq(origin, stanza, sender)
            return
        try:
            if kind == "presence":
                await self._presence(stanza, sender, to)
            elif kind == "message":
                await self._message(stanza, sender, to)
            elif kind == "iq":
                await self._iq(origin, stanza, sender, to)
        finally:
            # A stored room loaded only to answer a disco query or an invitation does not stay.
            room = self.rooms.get(to.bare)
            if room is not None and room.stored and not room.occupants:
                del self.rooms[to.bare]

    async def on_session_closed(self, session: Session) -> None:
        """A session that ends without unavailable presence leaves its rooms (the rooms it
        is in are among the targets of its directed presence)."""
        for target in list(session.directed):
            room = self.rooms.get(target.bare) if target.domain == self.domain else None
            if room is not None and session.jid in room.nicks:
                self._leave(room, session.jid, None)

    # -- presence ---------------------------------------------------------------------

    async def _presence(self, stanza: Element, sender: JID, to: JID) -> None:
        type_ = stanza.get("type")
        if type_ not in (None, "unavailable", "error"):
            return  # subscriptions and probes mean nothing to a room
        room_jid = to.bare
        if type_ in ("unavailable", "error"):
            room = self.rooms.get(room_jid)
            if room is not None and sender in room.nicks:
                self._leave(room, sender, stanza if type_ == "unavailable" else None)
            return
        if to.resource is None:
            raise JidMalformed("to enter a room, address the presence to room@service/nick")
        nick = to.resource
        room = await self.room(room_jid)
        if room is not None and sender in room.nicks:
            current = room.nicks[sender]
            if current == nick:
                self._update(room, sender, stanza)
            else:
                self._change_nick(room, sender, nick, stanza)
            return
        x = stanza.find(qn(NS_MUC, "x"))
        admin = sender.bare in self.admins
        created = False
        if room is None:
            if self.options.restrict_creation and not admin:
                raise NotAllowed("only service administrators create rooms here")
            if not admin:
                await self._check_quota(sender.bare)
            room = self.rooms.get(room_jid)  # someone may have created it meanwhile
        if room is None:
            room = Room(room_jid, self.default_config(), history_size=self.options.history_size)
            # §10.1.1: a room created by the older groupchat protocol (no <x/>) is not locked.
            room.locked = x is not None
            room.affiliations[sender.bare] = "owner"
            created = True
        password = x.findtext(qn(NS_MUC, "password")) if x is not None else None
        room.check_entry(sender, nick, password, admin=admin)
        if created:
            # Only now, once nothing can refuse the entry: a refused creation keeps nothing.
            self.rooms[room_jid] = room
            log.info("%s created room %s", sender.bare, room_jid)
            if not room.locked and room.config.persistent:
                try:
                    await self._save(room)  # no configuration step will come to save it
                except BaseException:
                    if self.rooms.get(room_jid) is room:
                        del self.rooms[room_jid]
                    raise
        occupant = room.enter(sender, nick, stanza, admin=admin)
        self._track(sender, room.occupant_jid(nick), add=True)
        # §7.2.3: the others' presence first, then everyone sees the newcomer, itself last.
        viewer = occupant
        for other in list(room.occupants.values()):
            if other is not occupant:
                presence, data = self._presence_for(room, other, viewer)
                self._send(room, presence, [sender], data)
        codes: list[str] = []
        if room.config.whois == "anyone":
            codes.append(NON_ANONYMOUS)
        if room.config.archive:
            codes.append(LOGGED)
        if created and room.locked:
            codes.append(CREATED)
        if len(occupant.sessions) > 1:
            # Another session of an occupant: only it needs the room's state.
            own = occupant_presence(room, occupant)
            real = next(iter(occupant.sessions), None)
            own.append(user_x(occupant, jid=real, codes=(*codes, SELF)))
            self._send(room, own, [sender])
        else:
            self._broadcast_presence(room, occupant, self_codes=tuple(codes))
        self._send_history(room, sender, x)
        # §7.2.16: the subject last, even an empty one; it marks the end of the history.
        by = room.subject_by
        origin_jid = room.occupant_jid(by) if by and by in room.occupants else room.jid
        subject = make("message", from_=origin_jid, type="groupchat", id=new_stanza_id())
        ET.SubElement(subject, SUBJECT).text = room.subject or None
        self._send(room, subject, [sender])

    async def _check_quota(self, user: JID) -> None:
        """Raise if ``user`` owns ``max_rooms_per_user`` rooms already: each room costs memory
        while it lives (2,000 made in 11 s took 48 MB) and a row if it is stored. The scan of
        live rooms is linear, but it runs only when a room is created."""
        limit = self.options.max_rooms_per_user
        if not limit:
            return
        owned = {jid for jid, room in self.rooms.items() if room.affiliations.get(user) == "owner"}
        if len(owned) < limit:
            stored = await self.host.storage.rooms.rooms_of(str(user))
            owned.update(JID.parse(room) for room, aff in stored if aff == "owner")
        if len(owned) >= limit:
            raise NotAllowed(f"you own {len(owned)} rooms already, the most allowed here")

    def _track(self, session_jid: JID, occupant_jid: JID, *, add: bool) -> None:
        """Keep the session's directed-presence set right, so unavailable reaches the room."""
        session = self.host.router.session(session_jid) if session_jid.resource else None
        if session is None:
            return
        if add:
            session.directed.add(occupant_jid)
        else:
            session.directed.discard(occupant_jid)

    def _update(self, room: Room, sender: JID, stanza: Element) -> None:
        occupant = room.occupant_of(sender)
        assert occupant is not None
        occupant.sessions[sender] = stanza
        self._broadcast_presence(room, occupant)

    def _change_nick(self, room: Room, sender: JID, nick: str, stanza: Element) -> None:
        occupant = room.occupant_of(sender)
        assert occupant is not None
        holder = room.occupants.get(nick)
        if holder is not None:
            raise StanzaError("that nickname is in use", condition="conflict")
        old_jid = room.occupant_jid(occupant.nick)
        self._broadcast_presence(room, occupant, unavailable=True, codes=(NICK_CHANGED,), nick=nick)
        room.rename(occupant, nick)
        occupant.sessions[sender] = stanza
        for session in occupant.sessions:
            self._track(session, old_jid, add=False)
            self._track(session, room.occupant_jid(nick), add=True)
        self._broadcast_presence(room, occupant)

    def _leave(self, room: Room, sender: JID, stanza: Element | None) -> None:
        occupant = room.occupant_of(sender)
        if occupant is None:
            return
        nick = occupant.nick
        if stanza is not None:
            occupant.sessions[sender] = stanza
        last = room.leave(sender)
        self._track(sender, room.occupant_jid(nick), add=False)
        if last is None:
            # Other sessions stay; this one still hears that it left.
            out = occupant_presence(room, occupant, unavailable=True, base=stanza)
            out.append(user_x(occupant, jid=sender, codes=(SELF,), role="none"))
            self._send(room, out, [sender])
            return
        last.sessions = {sender: stanza} if stanza is not None else {sender: make("presence")}
        self._broadcast_presence(room, last, unavailable=True, role="none")
        self._unload_if_idle(room)

    def _remove(
        self,
        room: Room,
        occupant: Occupant,
        code: str,
        *,
        actor: str | None = None,
        reason: str | None = None,
        affiliation: str | None = None,
        extra: Element | None = None,
    ) -> None:
        """Take ``occupant`` out (kick, ban, lost membership, destruction) and say why."""
        room.remove(occupant)
        for session in occupant.sessions:
            self._track(session, room.occupant_jid(occupant.nick), add=False)
        kwargs: dict[str, Any] = {"role": "none", "actor": actor, "reason": reason}
        if affiliation is not None:
            kwargs["affiliation"] = affiliation
        self._broadcast_presence(
            room,
            occupant,
            unavailable=True,
            codes=(code,) if code else (),
            extra=extra,
            **kwargs,
        )

    # -- messages ---------------------------------------------------------------------

    async def _message(self, stanza: Element, sender: JID, to: JID) -> None:
        type_ = stanza.get("type", "normal")
        if type_ == "error":
            room = self.rooms.get(to.bare)
            if room is not None and sender in room.nicks:
                self._leave(room, sender, None)  # §16.6: an occupant that bounces is gone
            return
        room = await self.room(to.bare)
        if room is None or room.locked and sender not in room.nicks:
            raise ItemNotFound("no such room")
        if to.resource is not None:
            if type_ == "groupchat":
                raise BadRequest("groupchat messages go to the room, not to an occupant")
            await self._private(room, stanza, sender, to.resource)
            return
        if type_ == "groupchat":
            self._groupchat(room, stanza, sender)
            return
        x = stanza.find(qn(NS_USER, "x"))
        if x is not None and (invites := x.findall(qn(NS_USER, "invite"))):
            await self._invite(room, stanza, sender, invites)
        elif x is not None and (decline := x.find(qn(NS_USER, "decline"))) is not None:
            self._decline(room, sender, decline)
        else:
            raise NotAcceptable("send groupchat messages to the room")

    def _groupchat(self, room: Room, stanza: Element, sender: JID) -> None:
        occupant = room.occupant_of(sender)
        if occupant is None:
            raise NotAcceptable("only occupants may send messages to the room")
        if occupant.role == "visitor":
            raise Forbidden("visitors may not speak in a moderated room")
        subject = stanza.find(SUBJECT)
        if subject is not None and stanza.find(BODY) is None:
            if not room.config.change_subject and occupant.role != "moderator":
                raise Forbidden("only moderators may change the subject")
            room.subject = subject.text or ""
            room.subject_by = occupant.nick
            if room.stored:
                self._background(
                    self.host.storage.rooms.set_subject(
                        str(room.jid), room.subject or None, occupant.nick
                    )
                )
        out = clone(stanza)
        out.attrib.pop("to", None)
        out.set("from", str(room.occupant_jid(occupant.nick)))
        for old in out.findall(STANZA_ID):
            out.remove(old)  # §6 of XEP-0359: ids by the room come only from the room
        content = any(child.tag in _ARCHIVED for child in out)
        mam = self.mam
        if content and room.config.archive and mam is not None:
            mam.admit()  # the room's archive is behind: a wait error, before anyone gets it
        sid = new_stanza_id()
        ET.SubElement(out, STANZA_ID, {"id": sid, "by": str(room.jid)})
        now = datetime.now(UTC)
        if content and room.config.archive and mam is not None:
            now = mam.enqueue(room.jid, room.occupant_jid(occupant.nick), "in", out, sid)
        if out.find(BODY) is not None:
            room.remember(now, out, len(out.findtext(BODY) or ""))
        self._send(room, out, room.sessions())

    async def _private(self, room: Room, stanza: Element, sender: JID, nick: str) -> None:
        occupant = room.occupant_of(sender)
        if occupant is None:
            raise NotAcceptable("only occupants may send private messages")
        target = room.occupants.get(nick)
        if target is None:
            raise ItemNotFound("no occupant with that nickname")
        allowed = room.config.allow_pm
        if allowed == "none" or (
            allowed != "anyone"
            and (
                occupant.role == "visitor"
                or (allowed == "moderators" and occupant.role != "moderator")
            )
        ):
            raise Forbidden("private messages are not allowed in this room")
        for session in target.sessions:
            out = clone(stanza)
            out.set("from", str(room.occupant_jid(occupant.nick)))
            out.set("to", str(session))
            if out.find(qn(NS_USER, "x")) is None:
                ET.SubElement(out, qn(NS_USER, "x"))
            self._send(room, out)

    async def _invite(
        self, room: Room, stanza: Element, sender: JID, invites: list[Element]
    ) -> None:
        """§7.8.2 mediated invitations; in a members-only room the invitee becomes a member."""
        inviter = room.occupant_of(sender)
        affiliation = room.affiliation(sender)
        if inviter is None and AFFILIATION_RANK[affiliation] < AFFILIATION_RANK["admin"]:
            raise NotAcceptable("only occupants may invite")
        may_add = AFFILIATION_RANK[affiliation] >= AFFILIATION_RANK["admin"] or (
            room.config.allow_invites and affiliation == "member"
        )
        if room.config.members_only and not may_add:
            raise Forbidden("only admins may invite to this room")
        targets: list[tuple[JID, str | None]] = []
        for invite in invites:
            try:
                invitee = JID.parse(invite.get("to", ""))
            except ValueError as exc:
                raise JidMalformed(f"bad invitee: {exc}") from None
            targets.append((invitee, invite.findtext(qn(NS_USER, "reason"))))
        for invitee, reason in targets:
            if room.config.members_only and room.affiliation(invitee) == "none":
                room.affiliations[invitee.bare] = "member"
                await self._store_affiliation(room, invitee.bare, "member")
            out = make("message", to=invitee, from_=room.jid, id=stanza.get("id"))
            x = ET.SubElement(out, qn(NS_USER, "x"))
            invite = ET.SubElement(x, qn(NS_USER, "invite"), {"from": str(sender.bare)})
            if reason:
                ET.SubElement(invite, qn(NS_USER, "reason")).text = reason
            if room.config.password:
                ET.SubElement(x, qn(NS_USER, "password")).text = room.config.password
            body = f"{sender.bare} invites you to the room {room.jid}"
            ET.SubElement(out, BODY).text = body + (f": {reason}" if reason else "")
            ET.SubElement(
                out,
                qn(NS_CONFERENCE, "x"),
                {"jid": str(room.jid), **({"reason": reason} if reason else {})},
            )
            self._send(room, out)

    def _decline(self, room: Room, sender: JID, decline: Element) -> None:
        try:
            inviter = JID.parse(decline.get("to", ""))
        except ValueError as exc:
            raise JidMalformed(f"bad inviter: {exc}") from None
        out = make("message", to=inviter, from_=room.jid)
        x = ET.SubElement(out, qn(NS_USER, "x"))
        el = ET.SubElement(x, qn(NS_USER, "decline"), {"from": str(sender.bare)})
        if reason := decline.findtext(qn(NS_USER, "reason")):
            ET.SubElement(el, qn(NS_USER, "reason")).text = reason
        self._send(room, out)

    def _send_history(self, room: Room, to: JID, x: Element | None) -> None:
        request = history_request(x)
        for item in room.history_for(request, datetime.now(UTC)):
            out = clone(item.message)
            stamp = item.stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ET.SubElement(out, qn(NS_DELAY, "delay"), {"stamp": stamp, "from": str(room.jid)})
            self._send(room, out, [to])

    async def on_direct_invite(self, origin: Session | None, message: Element, to: JID) -> bool:
        """XEP-0249: an admin's (or, where allowed, a member's) direct invitation to a
        members-only room here makes the invitee a member, as a mediated one would."""
        x = message.find(qn(NS_CONFERENCE, "x"))
        if x is None or origin is None:
            return False
        try:
            room_jid = JID.parse(x.get("jid", ""))
        except ValueError:
            return False
        if room_jid.domain != self.domain or room_jid.local is None:
            return False
        room = await self.room(room_jid.bare)
        if room is None or not room.config.members_only:
            return False
        affiliation = room.affiliation(origin.jid)
        may_add = AFFILIATION_RANK[affiliation] >= AFFILIATION_RANK["admin"] or (
            room.config.allow_invites and affiliation == "member"
        )
        if may_add and room.affiliation(to) == "none":
            room.affiliations[to.bare] = "member"
            await self._store_affiliation(room, to.bare, "member")
        return False

    # -- iq ---------------------------------------------------------------------------

    async def _iq(self, origin: Session | None, iq: Element, sender: JID, to: JID) -> None:
        type_ = iq.get("type")
        if type_ not in ("get", "set"):
            return
        query = payload(iq)
        if query is None:
            raise BadRequest("an iq needs a payload")
        ns = query.tag[1:].partition("}")[0]
        room = await self.room(to.bare)
        if room is None:
            raise ItemNotFound("no such room")
        if to.resource is not None:
            self._occupant_iq(room, iq, sender, to.resource, ns)
            return
        if ns == NS_INFO and type_ == "get":
            self._reply(origin, iq, self._room_info(room))
        elif ns == NS_ITEMS and type_ == "get":
            self._reply(origin, iq, self._room_items(room, sender))
        elif ns == NS_PING and type_ == "get":
            self._reply(origin, iq)
        elif ns == NS_ADMIN:
            await self._admin(room, iq, query, sender, type_)
        elif ns == NS_OWNER:
            await self._owner(room, iq, query, sender, type_)
        elif ns == NS_MAM:
            await self._mam(origin, room, iq, query, sender)
        else:
            raise ServiceUnavailable()

    def _reply(self, origin: Session | None, iq: Element, *payloads: Element) -> None:
        reply = iq_result(iq, *payloads)
        if origin is not None:
            origin.deliver(reply)
        else:
            self._background(self.host.router.deliver(reply))

    def _occupant_iq(self, room: Room, iq: Element, sender: JID, nick: str, ns: str) -> None:
        """XEP-0410 self-ping (and pings of other occupants) are answered by the room."""
        if ns != NS_PING or iq.get("type") != "get":
            raise FeatureNotImplemented("the room does not forward iqs to occupants")
        if sender not in room.nicks:
            raise NotAcceptable("you are not in the room")
        if nick not in room.occupants:
            raise ItemNotFound("no occupant with that nickname")
        self._send(room, iq_result(iq))

    def _room_info(self, room: Room) -> Element:
        query = Element(qn(NS_INFO, "query"))
        name = room.config.name or room.jid.local or ""
        ET.SubElement(
            query, qn(NS_INFO, "identity"), {"category": "conference", "type": "text", "name": name}
        )
        features = room.features() + [NS_SID, NS_PING]
        if room.config.archive and self.mam is not None:
            features += [NS_MAM, "urn:xmpp:mam:2#extended"]
        for feature in sorted(set(features)):
            ET.SubElement(query, qn(NS_INFO, "feature"), {"var": feature})
        query.append(forms.info_form(room.config, room.subject, len(room.occupants)))
        return query

    def _room_items(self, room: Room, sender: JID) -> Element:
        query = Element(qn(NS_ITEMS, "query"))
        if room.config.public or sender in room.nicks:
            for nick in room.occupants:
                ET.SubElement(
                    query, qn(NS_ITEMS, "item"), {"jid": str(room.occupant_jid(nick)), "name": nick}
                )
        return query

    async def _service_iq(self, origin: Session | None, iq: Element, sender: JID) -> None:
        type_ = iq.get("type")
        if type_ not in ("get", "set"):
            return
        query = payload(iq)
        ns = query.tag[1:].partition("}")[0] if query is not None else ""
        if type_ == "get" and ns == NS_INFO:
            result = Element(qn(NS_INFO, "query"))
            ET.SubElement(
                result,
                qn(NS_INFO, "identity"),
                {"category": "conference", "type": "text", "name": "Group chats"},
            )
            for feature in (NS_INFO, NS_ITEMS, NS_MUC, NS_PING, NS_SID):
                ET.SubElement(result, qn(NS_INFO, "feature"), {"var": feature})
            self._reply(origin, iq, result)
        elif type_ == "get" and ns == NS_ITEMS:
            self._reply(origin, iq, await self._public_rooms())
        elif type_ == "get" and ns == NS_PING:
            self._reply(origin, iq)
        else:
            raise ServiceUnavailable()

    async def _public_rooms(self) -> Element:
        listed: dict[str, str] = {}
        for stored in await self.host.storage.rooms.list(self.domain):
            config = RoomConfig.from_dict(stored.config)
            if config.public:
                listed[stored.jid] = config.name or stored.jid.partition("@")[0]
        for room in self.rooms.values():
            if room.locked:
                continue
            key = str(room.jid)
            if room.config.public:
                listed[key] = room.config.name or room.jid.local or key
            else:
                listed.pop(key, None)
        query = Element(qn(NS_ITEMS, "query"))
        for jid, name in sorted(listed.items()):
            ET.SubElement(query, qn(NS_ITEMS, "item"), {"jid": jid, "name": name})
        return query

    # -- administration (§8, §9) ------------------------------------------------------

    def _actor(self, room: Room, sender: JID) -> tuple[Occupant | None, str]:
        if sender.bare in self.admins:
            return room.occupant_of(sender), "owner"
        return room.occupant_of(sender), room.affiliation(sender)

    async def _admin(
        self, room: Room, iq: Element, query: Element, sender: JID, type_: str
    ) -> None:
        items = query.findall(qn(NS_ADMIN, "item"))
        if not items:
            raise BadRequest("no <item/>")
        occupant, affiliation = self._actor(room, sender)
        if type_ == "get":
            self._send(room, iq_result(iq, self._list(room, items[0], occupant, affiliation)))
            return
        # Check every item before changing anything: a request is applied whole or not at all.
        changes: list[tuple[str, Any, str, str | None]] = []
        for item in items:
            reason = item.findtext(qn(NS_ADMIN, "reason"))
            if (role := item.get("role")) is not None:
                nick = item.get("nick")
                target = room.occupants.get(nick or "")
                if target is None:
                    raise ItemNotFound("no occupant with that nickname")
                if occupant is None:
                    raise Forbidden("only occupants may change roles")
                if affiliation == "owner" and occupant.affiliation != "owner":
                    occupant = replace(occupant)  # a service admin acts as an owner
                    occupant.affiliation = "owner"
                try:
                    room.check_role_change(occupant, target, role)
                except NotAcceptableRole:
                    raise BadRequest(f"unknown role {role!r}") from None
                changes.append(("role", target, role, reason))
            elif (new := item.get("affiliation")) is not None:
                try:
                    target_jid = JID.parse(item.get("jid", "")).bare
                except ValueError:
                    raise JidMalformed("an affiliation change needs a valid 'jid'") from None
                try:
                    room.check_affiliation_change(affiliation, target_jid, new)  # type: ignore[arg-type]
                except NotAcceptableRole:
                    raise BadRequest(f"unknown affiliation {new!r}") from None
                changes.append(("affiliation", target_jid, new, reason))
            else:
                raise BadRequest("an <item/> needs a role or an affiliation")
        actor = occupant.nick if occupant is not None else None
        for kind, target, value, reason in changes:
            if kind == "role":
                self._set_role(room, target, value, actor, reason)
            else:
                await self._set_affiliation(room, target, value, actor, reason)
        self._send(room, iq_result(iq))

    def _list(
        self, room: Room, item: Element, occupant: Occupant | None, affiliation: str
    ) -> Element:
        result = Element(qn(NS_ADMIN, "query"))
        if (role := item.get("role")) is not None:
            if (
                occupant is None
                or occupant.role != "moderator"
                and affiliation not in ("owner", "admin")
            ):
                raise Forbidden("only moderators may list roles")
            for other in room.occupants.values():
                if other.role == role:
                    real = next(iter(other.sessions), None)
                    attrs = {
                        "nick": other.nick,
                        "role": other.role,
                        "affiliation": other.affiliation,
                    }
                    if real is not None:
                        attrs["jid"] = str(real.bare)
                    ET.SubElement(result, qn(NS_ADMIN, "item"), attrs)
            return result
        wanted = item.get("affiliation")
        if wanted not in ("owner", "admin", "member", "outcast"):
            raise BadRequest("list by role or by affiliation owner, admin, member or outcast")
        if AFFILIATION_RANK[affiliation] < AFFILIATION_RANK["admin"]:
            if not (wanted == "member" and room.config.members_only and affiliation == "member"):
                raise Forbidden("only admins and owners may list affiliations")
        for jid, aff in sorted(room.affiliations.items(), key=lambda kv: str(kv[0])):
            if aff == wanted:
                el = ET.SubElement(
                    result, qn(NS_ADMIN, "item"), {"jid": str(jid), "affiliation": aff}
                )
                if reason := room.reasons.get(jid):
                    ET.SubElement(el, qn(NS_ADMIN, "reason")).text = reason
        return result

    def _set_role(
        self, room: Room, target: Occupant, role: str, actor: str | None, reason: str | None
    ) -> None:
        if role == "none":
            self._remove(room, target, KICKED, actor=actor, reason=reason)
            self._unload_if_idle(room)
            return
        target.role = role  # type: ignore[assignment]
        self._broadcast_presence(room, target, actor=actor, reason=reason)

    async def _set_affiliation(
        self, room: Room, jid: JID, new: str, actor: str | None, reason: str | None
    ) -> None:
        if new == "none":
            room.affiliations.pop(jid, None)
            room.reasons.pop(jid, None)
        else:
            room.affiliations[jid] = new  # type: ignore[assignment]
            if reason:
                room.reasons[jid] = reason
            else:
                room.reasons.pop(jid, None)
        await self._store_affiliation(room, jid, new)
        for occupant in [o for o in room.occupants.values() if _covers(jid, o.bare)]:
            effective = room.affiliation(occupant.bare)  # a user's own outranks its domain's
            if effective == "outcast":
                self._remove(
                    room, occupant, BANNED, actor=actor, reason=reason, affiliation="outcast"
                )
            elif effective == "none" and room.config.members_only:
                self._remove(
                    room,
                    occupant,
                    AFFILIATION_CHANGED,
                    actor=actor,
                    reason=reason,
                    affiliation="none",
                )
            elif effective != occupant.affiliation:
                occupant.affiliation = effective
                occupant.role = role_for(effective, room.config)
                self._broadcast_presence(room, occupant, actor=actor, reason=reason)
        self._unload_if_idle(room)

    # -- owner: configuration and destruction (§10) -----------------------------------

    async def _owner(
        self, room: Room, iq: Element, query: Element, sender: JID, type_: str
    ) -> None:
        _, affiliation = self._actor(room, sender)
        if affiliation != "owner":
            raise Forbidden("only owners may configure or destroy the room")
        limit = self.options.max_occupants
        if type_ == "get":
            result = Element(qn(NS_OWNER, "query"))
            result.append(forms.config_form(room.config, limit))
            self._send(room, iq_result(iq, result))
            return
        destroy = query.find(qn(NS_OWNER, "destroy"))
        if destroy is not None:
            await self._destroy(room, destroy)
            self._send(room, iq_result(iq))
            return
        form = query.find(qn(forms.NS_DATA, "x"))
        if form is None:
            raise BadRequest("expected a data form or <destroy/>")
        if form.get("type") == "cancel":
            if room.locked:
                await self._destroy(room, None)  # §10.1.3: cancelling creation destroys it
            self._send(room, iq_result(iq))
            return
        old = room.config
        room.config = forms.apply_form(old, form, limit)
        was_locked = room.locked
        room.locked = False
        await self._save(room)
        self._send(room, iq_result(iq))
        if not was_locked:
            self._config_changed(room, old)

    def _config_changed(self, room: Room, old: RoomConfig) -> None:
        notice = make("message", from_=room.jid, type="groupchat", id=new_stanza_id())
        x = ET.SubElement(notice, qn(NS_USER, "x"))
        codes = [CONFIG_CHANGED]
        if old.whois != room.config.whois:
            codes.append("172" if room.config.whois == "anyone" else "173")
        for code in codes:
            ET.SubElement(x, qn(NS_USER, "status"), {"code": code})
        self._send(room, notice, room.sessions())
        if room.config.members_only and not old.members_only:
            for occupant in list(room.occupants.values()):
                if AFFILIATION_RANK[occupant.affiliation] < AFFILIATION_RANK["member"]:
                    self._remove(room, occupant, MEMBERS_ONLY_NOW)
        if room.config.moderated != old.moderated:
            for occupant in room.occupants.values():
                role = role_for(occupant.affiliation, room.config)
                if occupant.role in ("participant", "visitor") and role != occupant.role:
                    occupant.role = role
                    self._broadcast_presence(room, occupant)

    async def _destroy(
        self, room: Room, destroy: Element | None, reason: str | None = None
    ) -> None:
        extra = Element(qn(NS_USER, "destroy"))
        if destroy is not None:
            if alternate := destroy.get("jid"):
                extra.set("jid", alternate)
            reason = destroy.findtext(qn(NS_OWNER, "reason")) or reason
        if reason:
            ET.SubElement(extra, qn(NS_USER, "reason")).text = reason
        for occupant in list(room.occupants.values()):
            self._remove(room, occupant, "", extra=extra, affiliation="none")
        if room.stored:
            await self.host.storage.rooms.delete(str(room.jid))
            room.stored = False
        if self.rooms.get(room.jid) is room:
            del self.rooms[room.jid]
        purge = self._forget_archive(room)
        if purge is not None:
            await asyncio.shield(purge)
        log.info("room %s destroyed", room.jid)

    def _forget_archive(self, room: Room) -> asyncio.Task[None] | None:
        """A room that is gone takes its archive along: a new room of the same name must not
        show the old one's history to its (maybe different) members. The cut-off is taken
        now, so a new room's messages, archived later, are never purged; archive queries on
        the room wait for the purge."""
        mam = self.mam
        if mam is None:
            return None
        task = asyncio.create_task(self._purge_archive(room.jid, mam, mam.next_stamp()))
        self._purges[room.jid] = task
        self.host.background.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self.host.background.discard(task)
            if self._purges.get(room.jid) is task:
                del self._purges[room.jid]

        task.add_done_callback(done)
        return task

    async def _purge_archive(self, jid: JID, mam: Mam, cutoff: datetime) -> None:
        async with self._purge_slot:
            await mam.flushed()
            try:
                await self.host.storage.archive.purge(str(jid), older_than=cutoff)
            except SQLAlchemyError:
                log.exception("could not purge the archive of the gone room %s", jid)

    # -- archive (XEP-0313 on the room's JID) -----------------------------------------

    async def _mam(
        self, origin: Session | None, room: Room, iq: Element, query: Element, sender: JID
    ) -> None:
        mam = self.mam
        if mam is None or origin is None:
            raise ServiceUnavailable()
        affiliation = room.affiliation(sender)
        if affiliation == "outcast":
            raise Forbidden("you are banned from this room")
        if room.config.members_only and sender not in room.nicks:
            if AFFILIATION_RANK[affiliation] < AFFILIATION_RANK["member"]:
                raise Forbidden("the archive of a members-only room is for members")
        if (purge := self._purges.get(room.jid)) is not None:
            await asyncio.shield(purge)  # an earlier room of this name is still being purged
        tag = query.tag.rpartition("}")[2]
        if tag == "query" and iq.get("type") == "set":
            await mam.answer_query(origin, iq, room.jid)
        elif tag == "query":
            mam.answer_form(origin, iq)
        elif tag == "metadata":
            await mam.answer_metadata(origin, iq, room.jid)
        else:
            raise ServiceUnavailable()

    # -- administration from outside XMPP (natterctl room …) ---------------------------

    async def create_room(self, jid: JID, config: RoomConfig, owners: Iterable[JID]) -> Room:
        """A configured (unlocked) room; raises ValueError if it exists already."""
        if await self.room(jid) is not None:
            raise ValueError(f"room {jid} exists already")
        room = Room(jid, config, history_size=self.options.history_size)
        for owner in owners:
            room.affiliations[owner.bare] = "owner"
        self.rooms[jid] = room
        try:
            await self._save(room)
        except BaseException:
            del self.rooms[jid]
            raise
        self._unload_if_idle(room)
        return room

    async def destroy_room(self, room: Room, reason: str | None = None) -> None:
        """Occupants are told (§10.9) and removed; a persistent room leaves storage."""
        await self._destroy(room, None, reason)

    async def set_affiliation(
        self, room: Room, jid: JID, affiliation: str, reason: str | None = None
    ) -> None:
        """As an owner would, without the owner checks; occupants see the change at once."""
        if affiliation not in AFFILIATION_RANK:
            raise ValueError(f"unknown affiliation {affiliation!r}")
        await self._set_affiliation(room, jid.bare, affiliation, None, reason)

    def control_commands(self) -> Mapping[str, CommandHandler]:
        from xmpp_server.modules.muc import admin

        return admin.commands(self)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.host.background.add(task)
        task.add_done_callback(self.host.background.discard)


def _covers(jid: JID, user: JID) -> bool:
    """Whether an affiliation of ``jid`` (a user or a whole domain) applies to ``user``."""
    return jid == user or (jid.local is None and jid.domain == user.domain)
