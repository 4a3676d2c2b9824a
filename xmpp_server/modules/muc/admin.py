"""Room administration for ``natterctl room …``.

The commands are control commands (:mod:`xmpp_server.control`): while natterd runs, its MUC
module answers them, so occupants see a change at once (a banned occupant is removed, a
destroyed room's occupants are told). When natterd is not running, natterctl runs the very same
commands on the database alone, through :class:`StoredRooms`, which offers the few helpers of
:class:`~xmpp_server.modules.muc.service.Muc` they use. Requests and answers are the JSON
objects of the control socket either way; natterctl formats the answers.

Requests (every command also takes ``"command"``)::

    room.create    {"room", "owners"?: [jid], "name"?, "members_only"?, "public"?,
                    "password"?, "max_occupants"?, "whois"?}   -> {"room", "owners"}
    room.list      {}                                          -> {"rooms": [...], "live"}
    room.show      {"room"}                                    -> {"room", "config", ...}
    room.delete    {"room", "reason"?}                         -> {"room", "occupants"}
    room.members   {"room", "affiliation"?}                    -> {"room", "members": [...]}
    room.affiliate {"room", "jid", "affiliation", "reason"?}   -> {"room", "jid", ...}

``room`` is a name on the service or a full ``name@service``; rooms made here are persistent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from xmpp_server.control import CommandHandler, ControlError
from xmpp_server.errors import Conflict
from xmpp_server.jid import JID
from xmpp_server.modules.muc.room import AFFILIATION_RANK, Room, RoomConfig
from xmpp_server.modules.muc.service import (
    Muc,
    MucOptions,
    default_config,
    load_room,
    service_domain,
)
from xmpp_server.storage.rooms import Affiliation as StoredAffiliation
from xmpp_server.storage.rooms import Rooms

COMMANDS = (
    "room.create",
    "room.list",
    "room.show",
    "room.delete",
    "room.members",
    "room.affiliate",
)
AFFILIATIONS = ("owner", "admin", "member", "outcast")  # what a room lists and stores
CHANGES = (*AFFILIATIONS, "none")  # "none" removes an affiliation
WHOIS = ("moderators", "anyone")


class InvalidRequest(ControlError):
    """The request itself is wrong (a bad JID, another service's room): natterctl exits 2."""


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A checked request; what a command does not take is left at its default."""

    command: str
    room: JID | None = None
    jid: JID | None = None
    affiliation: str | None = None
    reason: str | None = None
    owners: tuple[JID, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)  # RoomConfig fields to set


def room_jid(text: object, domain: str) -> JID:
    """``name`` or ``name@domain`` as the room's bare JID on the service ``domain``."""
    if not isinstance(text, str) or not text:
        raise InvalidRequest("a room is needed: a name or name@" + domain)
    try:
        jid = JID.parse(text if "@" in text else f"{text}@{domain}")
    except ValueError as exc:
        raise InvalidRequest(f"invalid room {text!r}: {exc}") from None
    if jid.local is None or jid.resource is not None:
        raise InvalidRequest(f"invalid room {text!r}: expected a name or name@{domain}")
    if jid.domain != domain:
        raise InvalidRequest(
            f"room {text!r} is not on this server's MUC service {domain}"
            " (set [modules.muc] host to manage another)"
        )
    return jid


def member_jid(text: object) -> JID:
    """A user's bare JID (``user@domain``): the MUC module matches affiliations by bare JID,
    so one for a whole domain would be listed but never applied."""
    if not isinstance(text, str) or not text:
        raise InvalidRequest("a JID is needed")
    try:
        jid = JID.parse(text)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JID {text!r}: {exc}") from None
    if jid.local is None or jid.resource is not None:
        raise InvalidRequest(f"invalid JID {text!r}: expected a bare JID like user@domain")
    return jid


def _choice(value: object, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidRequest(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _text(message: Mapping[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    return value


def _settings(message: Mapping[str, Any], max_occupants: int) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key in ("name", "password"):
        if (text := _text(message, key)) is not None:
            settings[key] = text
    for key in ("members_only", "public"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise InvalidRequest(f"{key} must be true or false")
            settings[key] = value
    limit = message.get("max_occupants")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidRequest("max_occupants must be a whole number")
        if not 1 <= limit <= max_occupants:
            raise InvalidRequest(
                f"max_occupants must be between 1 and {max_occupants}"
                " (the service's limit, [modules.muc] max_occupants)"
            )
        settings["max_occupants"] = limit
    if (whois := message.get("whois")) is not None:
        settings["whois"] = _choice(whois, WHOIS, "whois")
    return settings


def parse_request(message: Mapping[str, Any], domain: str, max_occupants: int) -> Request:
    """Check a request as far as it can be without the rooms; raise InvalidRequest.

    natterctl calls it before sending, so a mistake is a usage error whichever side would
    have run the command; the commands call it again, for any other client of the socket.
    """
    command = message.get("command")
    if command not in COMMANDS:
        raise InvalidRequest(f"unknown room command {command!r}")
    assert isinstance(command, str)
    if command == "room.list":
        return Request(command)
    room = room_jid(message.get("room"), domain)
    if command == "room.create":
        owners = message.get("owners", [])
        if not isinstance(owners, list):
            raise InvalidRequest("owners must be a list of JIDs")
        return Request(
            command,
            room,
            owners=tuple(dict.fromkeys(member_jid(owner) for owner in owners)),
            settings=_settings(message, max_occupants),
        )
    if command == "room.members":
        wanted = message.get("affiliation")
        affiliation = None if wanted is None else _choice(wanted, AFFILIATIONS, "affiliation")
        return Request(command, room, affiliation=affiliation)
    if command == "room.affiliate":
        return Request(
            command,
            room,
            jid=member_jid(message.get("jid")),
            affiliation=_choice(message.get("affiliation"), CHANGES, "affiliation"),
            reason=_text(message, "reason") or None,
        )
    return Request(command, room, reason=_text(message, "reason") or None)


# -- the commands -------------------------------------------------------------------------


class MucRooms(Protocol):
    """What the commands need of the MUC module (:class:`Muc` live, :class:`StoredRooms`)."""

    @property
    def domain(self) -> str: ...

    @property
    def rooms(self) -> Mapping[JID, Room]: ...

    def default_config(self) -> RoomConfig: ...

    async def room(self, jid: JID) -> Room | None: ...

    async def create_room(self, jid: JID, config: RoomConfig, owners: Iterable[JID]) -> Room: ...

    async def destroy_room(self, room: Room, reason: str | None = None) -> None: ...

    async def set_affiliation(
        self, room: Room, jid: JID, affiliation: str, reason: str | None = None
    ) -> None: ...


def _summary(jid: str, config: RoomConfig, room: Room | None, live: bool) -> dict[str, Any]:
    return {
        "room": jid,
        "name": config.name,
        "persistent": config.persistent,
        "public": config.public,
        "members_only": config.members_only,
        "password": bool(config.password),
        "locked": room is not None and room.locked,
        "occupants": (len(room.occupants) if room is not None else 0) if live else None,
    }


class RoomCommands:
    """The ``room.*`` commands over ``muc``; ``live``: natterd's own module, with occupants."""

    def __init__(self, muc: MucRooms, storage: Rooms, *, max_occupants: int, live: bool) -> None:
        self.muc = muc
        self.storage = storage
        self.max_occupants = max_occupants
        self.live = live

    def handlers(self) -> dict[str, CommandHandler]:
        return {
            "room.create": self.create,
            "room.list": self.list_rooms,
            "room.show": self.show,
            "room.delete": self.delete,
            "room.members": self.members,
            "room.affiliate": self.affiliate,
        }

    def _parse(self, message: Mapping[str, Any], command: str) -> Request:
        # The control server dispatches on "command"; a direct caller may leave it out.
        message = {**message, "command": command}
        request = parse_request(message, self.muc.domain, self.max_occupants)
        assert request.room is not None or command == "room.list"
        return request

    async def _existing(self, request: Request) -> Room:
        """The room to change, loaded as the module loads it (live: then it is in memory)."""
        assert request.room is not None
        room = await self.muc.room(request.room)
        if room is None:
            raise ControlError(f"no room {request.room}")
        return room

    async def _peek(self, request: Request) -> Room:
        """The room to look at: in memory if it is, else as stored (without loading it)."""
        assert request.room is not None
        room = self.muc.rooms.get(request.room)
        if room is None:
            room = await load_room(self.storage, request.room)
        if room is None:
            raise ControlError(f"no room {request.room}")
        return room

    async def create(self, message: dict[str, Any]) -> dict[str, Any]:
        request = self._parse(message, "room.create")
        assert request.room is not None
        config = replace(self.muc.default_config(), **request.settings, persistent=True)
        try:
            room = await self.muc.create_room(request.room, config, request.owners)
        except ValueError:
            raise ControlError(f"room {request.room} exists already") from None
        return {"room": str(room.jid), "owners": sorted(str(jid) for jid in room.owners())}

    async def list_rooms(self, message: dict[str, Any]) -> dict[str, Any]:
        listed: dict[str, dict[str, Any]] = {}
        for stored in await self.storage.list(self.muc.domain):
            config = RoomConfig.from_dict(stored.config)
            listed[stored.jid] = _summary(stored.jid, config, None, self.live)
        for room in list(self.muc.rooms.values()):  # the truth while loaded
            listed[str(room.jid)] = _summary(str(room.jid), room.config, room, self.live)
        return {"rooms": [listed[jid] for jid in sorted(listed)], "live": self.live}

    async def show(self, message: dict[str, Any]) -> dict[str, Any]:
        room = await self._peek(self._parse(message, "room.show"))
        config = room.config.to_dict()
        config["password"] = bool(room.config.password)  # never shown
        counts = dict.fromkeys(AFFILIATIONS, 0)
        for affiliation in room.affiliations.values():
            counts[affiliation] = counts.get(affiliation, 0) + 1
        occupants = None
        if self.live:
            occupants = [
                {
                    "nick": occupant.nick,
                    "jid": str(occupant.bare),
                    "role": occupant.role,
                    "affiliation": occupant.affiliation,
                    "sessions": len(occupant.sessions),
                }
                for occupant in sorted(room.occupants.values(), key=lambda o: o.nick)
            ]
        return {
            "room": str(room.jid),
            "config": config,
            "locked": room.locked,
            "subject": room.subject,
            "subject_by": room.subject_by,
            "affiliations": counts,
            "occupants": occupants,
            "live": self.live,
        }

    async def delete(self, message: dict[str, Any]) -> dict[str, Any]:
        request = self._parse(message, "room.delete")
        room = await self._existing(request)
        told = len(room.occupants)
        await self.muc.destroy_room(room, request.reason)
        return {"room": str(room.jid), "occupants": told}

    async def members(self, message: dict[str, Any]) -> dict[str, Any]:
        request = self._parse(message, "room.members")
        room = await self._peek(request)
        items = sorted(
            room.affiliations.items(), key=lambda kv: (-AFFILIATION_RANK[kv[1]], str(kv[0]))
        )
        return {
            "room": str(room.jid),
            "members": [
                {"jid": str(jid), "affiliation": affiliation, "reason": room.reasons.get(jid)}
                for jid, affiliation in items
                if request.affiliation in (None, affiliation)
            ],
        }

    async def affiliate(self, message: dict[str, Any]) -> dict[str, Any]:
        request = self._parse(message, "room.affiliate")
        assert request.jid is not None and request.affiliation is not None
        room = await self._existing(request)
        target, new = request.jid, request.affiliation
        previous = room.affiliation(target)
        try:
            room.check_affiliation_change("owner", target, new)
        except Conflict:
            raise ControlError(
                f"{target} is the last owner of {room.jid}; make another owner first"
            ) from None
        removed = [
            o.nick
            for o in room.occupants.values()
            if o.bare == target and (new == "outcast" or new == "none" and room.config.members_only)
        ]
        await self.muc.set_affiliation(room, target, new, request.reason)
        return {
            "room": str(room.jid),
            "jid": str(target),
            "affiliation": new,
            "previous": previous,
            "removed": removed,
        }


def commands(muc: Muc) -> Mapping[str, CommandHandler]:
    """The commands as natterd's MUC module answers them."""
    storage = muc.host.storage.rooms
    limit: int = muc.options.max_occupants
    return RoomCommands(muc, storage, max_occupants=limit, live=True).handlers()


# -- without natterd ----------------------------------------------------------------------


class StoredRooms:
    """The helpers of :class:`Muc` that :class:`RoomCommands` uses, on the database alone:
    natterd is not running, so no room is in memory and nobody is in a room."""

    def __init__(self, storage: Rooms, options: MucOptions, server_domain: str) -> None:
        self.storage = storage
        self.options = options
        self.domain = service_domain(options.host, server_domain)
        self.rooms: dict[JID, Room] = {}

    def default_config(self) -> RoomConfig:
        return default_config(self.options)

    async def room(self, jid: JID) -> Room | None:
        return await load_room(self.storage, jid)

    async def create_room(self, jid: JID, config: RoomConfig, owners: Iterable[JID]) -> Room:
        if not await self.storage.create(str(jid), config.to_dict()):
            raise ValueError(f"room {jid} exists already")
        room = Room(jid, config, history_size=0)
        room.stored = True
        for owner in owners:
            room.affiliations[owner.bare] = "owner"
        await self.storage.set_affiliations(
            str(jid), [StoredAffiliation(str(owner), "owner") for owner in room.owners()]
        )
        return room

    async def destroy_room(self, room: Room, reason: str | None = None) -> None:
        await self.storage.delete(str(room.jid))

    async def set_affiliation(
        self, room: Room, jid: JID, affiliation: str, reason: str | None = None
    ) -> None:
        item = StoredAffiliation(str(jid.bare), affiliation, reason=reason or None)
        await self.storage.set_affiliation(str(room.jid), item)


def offline_commands(
    storage: Rooms, options: MucOptions, server_domain: str
) -> Mapping[str, CommandHandler]:
    """The same commands on the database, for natterctl when natterd is not running."""
    muc = StoredRooms(storage, options, server_domain)
    return RoomCommands(muc, storage, max_occupants=options.max_occupants, live=False).handlers()
