"""A room's state and XEP-0045's rules, without I/O: who may enter, speak, kick or ban whom,
and what the presence and status codes sent for each change look like.

The shell (:mod:`.service`) loads and stores rooms and delivers what this module builds.
Affiliations are long-lived and keyed by bare JID; roles exist only while an occupant is in
the room and follow from the affiliation and the room's configuration (§5.1, §5.2).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

from xmpp_server.errors import (
    Conflict,
    Forbidden,
    ItemNotFound,
    NotAllowed,
    NotAuthorized,
    RegistrationRequired,
    ServiceUnavailable,
)
from xmpp_server.jid import JID
from xmpp_server.stanza import clone, make, qn
from xmpp_server.xml import Element

NS_MUC = "http://jabber.org/protocol/muc"
NS_USER = f"{NS_MUC}#user"
NS_ADMIN = f"{NS_MUC}#admin"
NS_OWNER = f"{NS_MUC}#owner"
NS_DELAY = "urn:xmpp:delay"

Affiliation = Literal["owner", "admin", "member", "none", "outcast"]
Role = Literal["moderator", "participant", "visitor", "none"]
AFFILIATION_RANK: dict[str, int] = {"owner": 4, "admin": 3, "member": 2, "none": 1, "outcast": 0}
ROLE_RANK: dict[str, int] = {"moderator": 3, "participant": 2, "visitor": 1, "none": 0}
Whois = Literal["moderators", "anyone"]
AllowPm = Literal["anyone", "participants", "moderators", "none"]

# Status codes (XEP-0045 §15.6.2).
SELF = "110"
NON_ANONYMOUS = "100"
LOGGED = "170"
CREATED = "201"
NICK_CHANGED = "303"
BANNED = "301"
KICKED = "307"
AFFILIATION_CHANGED = "321"
MEMBERS_ONLY_NOW = "322"
CONFIG_CHANGED = "104"
SHUTDOWN = "332"


@dataclass
class RoomConfig:
    """The muc#roomconfig settings this server implements; stored as a dict."""

    name: str = ""
    description: str = ""
    persistent: bool = False
    public: bool = True
    members_only: bool = False
    moderated: bool = False
    password: str = ""  # empty: no password
    max_occupants: int = 1000  # 0: no limit beyond the service's
    whois: Whois = "moderators"
    allow_pm: AllowPm = "anyone"
    change_subject: bool = False  # participants may change the subject
    allow_invites: bool = False  # members may invite to a members-only room
    archive: bool = True  # groupchat kept in the room's MAM archive

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoomConfig:
        """Tolerant of keys from older or newer versions: unknown ones are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Occupant:
    nick: str
    bare: JID
    role: Role
    affiliation: Affiliation
    # Every session of the user in the room under this nick, with its last presence.
    sessions: dict[JID, Element] = field(default_factory=dict)
    # Presence as others see it (with real JID or without), serialized; cleared on change.
    rendered: dict[bool, tuple[Element, bytes]] = field(default_factory=dict, compare=False)

    @property
    def presence(self) -> Element | None:
        for stanza in self.sessions.values():
            return stanza
        return None


@dataclass(frozen=True, slots=True)
class HistoryItem:
    stamp: datetime
    message: Element  # as broadcast: from room/nick, with the room's stanza-id
    chars: int


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """XEP-0045 §7.2.15 ``<history/>``: every given limit applies."""

    maxstanzas: int | None = None
    maxchars: int | None = None
    seconds: int | None = None
    since: datetime | None = None


def role_for(affiliation: str, config: RoomConfig) -> Role:
    """Default role on entering (§5.1.2)."""
    if affiliation in ("owner", "admin"):
        return "moderator"
    if affiliation == "member" or not config.moderated:
        return "participant"
    return "visitor"


class Room:
    def __init__(
        self, jid: JID, config: RoomConfig, *, history_size: int, locked: bool = False
    ) -> None:
        self.jid = jid
        self.config = config
        self.affiliations: dict[JID, Affiliation] = {}
        self.reasons: dict[JID, str] = {}
        self.occupants: dict[str, Occupant] = {}
        self.nicks: dict[JID, str] = {}  # occupant session (full JID) → nick
        self.subject = ""
        self.subject_by: str | None = None
        self.history: deque[HistoryItem] = deque(maxlen=max(history_size, 1))
        self.history_size = history_size
        self.locked = locked  # created, waiting for the owner's configuration (§10.1)
        self.stored = False  # has a row in storage (persistent rooms)

    # -- lookups ----------------------------------------------------------------------

    def affiliation(self, jid: JID) -> Affiliation:
        """The user's own affiliation, else its server's (§9.1: a whole domain can be banned)."""
        found = self.affiliations.get(jid.bare)
        if found is None and jid.local is not None:
            found = self.affiliations.get(JID(None, jid.domain, None))
        return found or "none"

    def occupant_of(self, full: JID) -> Occupant | None:
        nick = self.nicks.get(full)
        return self.occupants.get(nick) if nick is not None else None

    def occupant_jid(self, nick: str) -> JID:
        return JID(self.jid.local, self.jid.domain, nick)

    def owners(self) -> list[JID]:
        return [jid for jid, aff in self.affiliations.items() if aff == "owner"]

    def sessions(self) -> list[JID]:
        return list(self.nicks)

    def shows_jid_to(self, viewer: Occupant | None) -> bool:
        return self.config.whois == "anyone" or (viewer is not None and viewer.role == "moderator")

    # -- entering ---------------------------------------------------------------------

    def check_entry(self, user: JID, nick: str, password: str | None, *, admin: bool) -> None:
        """Raise the §7.2 error that keeps ``user`` out, if any (``admin``: service admin)."""
        affiliation = self.affiliation(user)
        if admin:
            affiliation = "owner"
        if self.locked and affiliation != "owner":
            raise ItemNotFound("the room is being created and not yet configured")
        if affiliation == "outcast":
            raise Forbidden("you are banned from this room")
        holder = self.occupants.get(nick)
        if holder is not None and holder.bare != user.bare:
            raise Conflict("that nickname is in use")
        if self.config.members_only and AFFILIATION_RANK[affiliation] < AFFILIATION_RANK["member"]:
            raise RegistrationRequired("this room is for members only")
        if self.config.password and affiliation not in ("owner", "admin"):
            if password != self.config.password:
                raise NotAuthorized("a password is required to enter this room")
        limit = self.config.max_occupants
        if limit and len(self.occupants) >= limit and holder is None:
            if affiliation not in ("owner", "admin"):
                raise ServiceUnavailable("the room is full")

    def enter(self, user: JID, nick: str, presence: Element, *, admin: bool) -> Occupant:
        occupant = self.occupants.get(nick)
        if occupant is None:
            affiliation: Affiliation = "owner" if admin else self.affiliation(user)
            occupant = Occupant(nick, user.bare, role_for(affiliation, self.config), affiliation)
            self.occupants[nick] = occupant
        occupant.sessions[user] = presence
        self.nicks[user] = nick
        return occupant

    def leave(self, user: JID) -> Occupant | None:
        """Remove one session; returns the occupant when that was its last session."""
        nick = self.nicks.pop(user, None)
        if nick is None:
            return None
        occupant = self.occupants[nick]
        occupant.sessions.pop(user, None)
        if occupant.sessions:
            return None
        del self.occupants[nick]
        return occupant

    def remove(self, occupant: Occupant) -> None:
        for session in occupant.sessions:
            self.nicks.pop(session, None)
        self.occupants.pop(occupant.nick, None)

    def rename(self, occupant: Occupant, new_nick: str) -> None:
        del self.occupants[occupant.nick]
        occupant.nick = new_nick
        self.occupants[new_nick] = occupant
        for session in occupant.sessions:
            self.nicks[session] = new_nick

    # -- permissions (§5.1 roles, §5.2 affiliations) ------------------------------------

    def check_role_change(self, actor: Occupant, target: Occupant, role: str) -> None:
        if role not in ROLE_RANK:
            raise NotAcceptableRole(role)
        if role == "moderator" or target.role == "moderator" and role != "moderator":
            # Granting or revoking moderator status is for admins and owners (§9.6, §9.7).
            if AFFILIATION_RANK[actor.affiliation] < AFFILIATION_RANK["admin"]:
                raise Forbidden("only admins and owners may change moderators")
        elif actor.role != "moderator":
            raise Forbidden("only moderators may change roles")
        if target is not actor and (
            AFFILIATION_RANK[target.affiliation] >= AFFILIATION_RANK["admin"]
            and AFFILIATION_RANK[target.affiliation] >= AFFILIATION_RANK[actor.affiliation]
        ):
            raise NotAllowed("the occupant's affiliation is not below yours")

    def check_affiliation_change(self, actor: Affiliation, target: JID, new: str) -> None:
        if new not in AFFILIATION_RANK:
            raise NotAcceptableRole(new)
        if AFFILIATION_RANK[actor] < AFFILIATION_RANK["admin"]:
            raise Forbidden("only admins and owners may change affiliations")
        current = self.affiliation(target)
        if actor == "admin":
            if new in ("admin", "owner"):
                raise Forbidden("only owners may grant admin or owner")
            if current in ("admin", "owner"):
                raise NotAllowed("only owners may change an admin or owner")
        if current == "owner" and new != "owner" and self.owners() == [target.bare]:
            raise Conflict("a room needs at least one owner")

    # -- history ----------------------------------------------------------------------

    def remember(self, stamp: datetime, message: Element, chars: int) -> None:
        if self.history_size:
            self.history.append(HistoryItem(stamp, message, chars))

    def history_for(self, request: HistoryRequest, now: datetime) -> list[HistoryItem]:
        items = list(self.history)
        if request.since is not None:
            items = [item for item in items if item.stamp > request.since]
        if request.seconds is not None:
            cutoff = now - timedelta(seconds=request.seconds)
            items = [item for item in items if item.stamp >= cutoff]
        if request.maxstanzas is not None:
            items = items[len(items) - request.maxstanzas :] if request.maxstanzas else []
        if request.maxchars is not None:
            kept: list[HistoryItem] = []
            total = 0
            for item in reversed(items):
                total += item.chars
                if total > request.maxchars:
                    break
                kept.append(item)
            items = kept[::-1]
        return items

    # -- what occupants see -----------------------------------------------------------

    def features(self) -> list[str]:
        c = self.config
        return [
            NS_MUC,
            "muc_persistent" if c.persistent else "muc_temporary",
            "muc_public" if c.public else "muc_hidden",
            "muc_membersonly" if c.members_only else "muc_open",
            "muc_moderated" if c.moderated else "muc_unmoderated",
            "muc_nonanonymous" if c.whois == "anyone" else "muc_semianonymous",
            "muc_passwordprotected" if c.password else "muc_unsecured",
        ]


class NotAcceptableRole(Exception):
    """Raised for an unknown role or affiliation value; the shell answers bad-request."""


def user_x(
    occupant: Occupant,
    *,
    jid: JID | None,
    codes: tuple[str, ...] = (),
    nick: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    role: str | None = None,
    affiliation: str | None = None,
) -> Element:
    """``<x xmlns='…muc#user'>`` with the occupant's item and status codes."""
    x = Element(qn(NS_USER, "x"))
    attrs = {
        "affiliation": affiliation or occupant.affiliation,
        "role": role or occupant.role,
    }
    if jid is not None:
        attrs["jid"] = str(jid)
    if nick is not None:
        attrs["nick"] = nick
    item = ET.SubElement(x, qn(NS_USER, "item"), attrs)
    if actor is not None:
        ET.SubElement(item, qn(NS_USER, "actor"), {"nick": actor})
    if reason:
        ET.SubElement(item, qn(NS_USER, "reason")).text = reason
    for code in codes:
        ET.SubElement(x, qn(NS_USER, "status"), {"code": code})
    return x


_MUC_TAGS = (qn(NS_MUC, "x"), qn(NS_USER, "x"))


def occupant_presence(
    room: Room,
    occupant: Occupant,
    *,
    unavailable: bool = False,
    base: Element | None = None,
) -> Element:
    """The occupant's presence as the room shows it, without ``to`` and without ``<x/>``:
    the user's own presence (show, status, caps…) minus what was addressed to the room."""
    source = base if base is not None else occupant.presence
    if source is None or unavailable:
        out = make("presence", from_=room.occupant_jid(occupant.nick), type="unavailable")
        if source is not None and unavailable:
            for child in source:
                if child.tag == qn("jabber:client", "status"):
                    out.append(child)
        return out
    out = clone(source)
    for child in list(out):
        if child.tag in _MUC_TAGS:
            out.remove(child)
    out.attrib.pop("to", None)
    out.attrib.pop("id", None)
    out.set("from", str(room.occupant_jid(occupant.nick)))
    return out


def history_request(x: Element | None) -> HistoryRequest:
    """Read ``<history/>`` from the join's ``<x xmlns='…muc'>``; bad values are ignored."""
    history = x.find(qn(NS_MUC, "history")) if x is not None else None
    if history is None:
        return HistoryRequest()

    def number(name: str) -> int | None:
        text = history.get(name)
        if text is None:
            return None
        try:
            return max(0, int(text))
        except ValueError:
            return None

    since = None
    if text := history.get("since"):
        try:
            value = text.strip()
            since = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "Zz" else value)
            if since.tzinfo is None:
                since = None
        except ValueError:
            since = None
    return HistoryRequest(number("maxstanzas"), number("maxchars"), number("seconds"), since)
