"""XEP-0045's rules in the sans-IO room core: entry, roles, affiliations, history, forms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from xmpp_server.errors import StanzaError
from xmpp_server.jid import JID
from xmpp_server.modules.muc import forms
from xmpp_server.modules.muc.room import (
    NS_MUC,
    HistoryRequest,
    Room,
    RoomConfig,
    history_request,
    occupant_presence,
)
from xmpp_server.stanza import make, qn
from xmpp_server.xml import Element, fromstring

ROOM = JID.parse("team@conference.example.org")
OWNER = JID.parse("olivia@example.org/phone")
ADMIN = JID.parse("adam@example.org/laptop")
MEMBER = JID.parse("mia@example.org/desk")
STRANGER = JID.parse("sam@example.org/web")


def new_room(**config: object) -> Room:
    room = Room(ROOM, RoomConfig(**config), history_size=5)  # type: ignore[arg-type]
    room.affiliations = {OWNER.bare: "owner", ADMIN.bare: "admin", MEMBER.bare: "member"}
    return room


def condition(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(StanzaError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.condition


def test_entry_rules_follow_section_7_2() -> None:
    room = new_room(members_only=True, password="s3cret")
    assert condition(room.check_entry, STRANGER, "sam", "s3cret", admin=False) == (
        "registration-required"
    )
    assert condition(room.check_entry, MEMBER, "mia", "wrong", admin=False) == "not-authorized"
    room.check_entry(MEMBER, "mia", "s3cret", admin=False)
    room.check_entry(ADMIN, "adam", None, admin=False)  # admins need no password
    room.affiliations[STRANGER.bare] = "outcast"
    assert condition(room.check_entry, STRANGER, "sam", "s3cret", admin=False) == "forbidden"
    room.enter(MEMBER, "mia", make("presence"), admin=False)
    assert condition(room.check_entry, OWNER, "mia", None, admin=False) == "conflict"


def test_a_domain_ban_keeps_out_its_users_but_not_a_listed_member() -> None:
    room = new_room()
    room.affiliations[JID.parse("example.org")] = "outcast"
    assert condition(room.check_entry, STRANGER, "sam", None, admin=False) == "forbidden"
    room.check_entry(MEMBER, "mia", None, admin=False)  # her own affiliation outranks it
    room.check_entry(JID.parse("eve@example.net/x"), "eve", None, admin=False)


def test_locked_and_full_rooms() -> None:
    room = new_room(max_occupants=1)
    room.locked = True
    assert condition(room.check_entry, MEMBER, "mia", None, admin=False) == "item-not-found"
    room.check_entry(OWNER, "olivia", None, admin=False)
    room.locked = False
    room.enter(OWNER, "olivia", make("presence"), admin=False)
    assert condition(room.check_entry, MEMBER, "mia", None, admin=False) == "service-unavailable"
    room.check_entry(ADMIN, "adam", None, admin=False)  # admins pass a full room


def test_roles_come_from_affiliation_and_moderation() -> None:
    room = new_room(moderated=True)
    roles = {
        nick: room.enter(jid, nick, make("presence"), admin=False).role
        for jid, nick in ((OWNER, "o"), (ADMIN, "a"), (MEMBER, "m"), (STRANGER, "s"))
    }
    assert roles == {"o": "moderator", "a": "moderator", "m": "participant", "s": "visitor"}


def test_kick_and_voice_permissions() -> None:
    room = new_room()
    owner = room.enter(OWNER, "o", make("presence"), admin=False)
    admin = room.enter(ADMIN, "a", make("presence"), admin=False)
    member = room.enter(MEMBER, "m", make("presence"), admin=False)
    stranger = room.enter(STRANGER, "s", make("presence"), admin=False)
    # A participant may not kick (§8.2); a moderator may not kick an admin (not-allowed).
    assert condition(room.check_role_change, member, stranger, "none") == "forbidden"
    assert condition(room.check_role_change, admin, owner, "none") == "not-allowed"
    room.check_role_change(admin, stranger, "none")
    room.check_role_change(owner, admin, "none")
    room.check_role_change(admin, member, "visitor")
    # Granting moderator is for admins and owners only.
    stranger.role = "moderator"
    assert condition(room.check_role_change, stranger, member, "moderator") == "forbidden"


def test_affiliation_permissions() -> None:
    room = new_room()
    assert condition(room.check_affiliation_change, "member", STRANGER, "outcast") == "forbidden"
    room.check_affiliation_change("admin", STRANGER, "outcast")
    assert condition(room.check_affiliation_change, "admin", STRANGER, "admin") == "forbidden"
    assert condition(room.check_affiliation_change, "admin", OWNER, "none") == "not-allowed"
    room.check_affiliation_change("owner", ADMIN, "none")
    # The last owner stays.
    assert condition(room.check_affiliation_change, "owner", OWNER, "admin") == "conflict"
    room.affiliations[ADMIN.bare] = "owner"
    room.check_affiliation_change("owner", OWNER, "admin")


def test_history_limits_all_apply() -> None:
    room = new_room()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(8):  # only the last 5 are kept
        message = make("message", type="groupchat")
        room.remember(start + timedelta(minutes=i), message, chars=10)
    now = start + timedelta(minutes=7)
    assert len(room.history_for(HistoryRequest(), now)) == 5
    assert len(room.history_for(HistoryRequest(maxstanzas=2), now)) == 2
    assert room.history_for(HistoryRequest(maxstanzas=0), now) == []
    assert len(room.history_for(HistoryRequest(maxchars=25), now)) == 2
    assert len(room.history_for(HistoryRequest(seconds=60), now)) == 2
    since = start + timedelta(minutes=5)
    assert len(room.history_for(HistoryRequest(since=since), now)) == 2


def test_history_request_parsing_ignores_bad_values() -> None:
    x = fromstring(
        f"<x xmlns='{NS_MUC}'><history maxstanzas='3' maxchars='x' "
        "since='1970-01-01T00:00:00Z'/></x>"
    )
    request = history_request(x)
    assert request.maxstanzas == 3 and request.maxchars is None
    assert request.since == datetime(1970, 1, 1, tzinfo=UTC)
    assert history_request(None) == HistoryRequest()


def test_occupant_presence_drops_what_was_for_the_room() -> None:
    room = new_room()
    presence = fromstring(
        "<presence xmlns='jabber:client' to='team@conference.example.org/o' id='p1'>"
        f"<show>away</show><x xmlns='{NS_MUC}'><password>s3cret</password></x></presence>"
    )
    occupant = room.enter(OWNER, "o", presence, admin=False)
    out = occupant_presence(room, occupant)
    assert out.get("from") == "team@conference.example.org/o"
    assert out.get("to") is None and out.get("id") is None
    assert out.findtext(qn("jabber:client", "show")) == "away"
    assert out.find(qn(NS_MUC, "x")) is None  # the password never leaves the room


def _submit(**values: str) -> Element:
    form = Element(qn(forms.NS_DATA, "x"), {"type": "submit"})
    for var, value in {"FORM_TYPE": forms.FORM_CONFIG, **values}.items():
        field = Element(qn(forms.NS_DATA, "field"), {"var": var})
        text = Element(qn(forms.NS_DATA, "value"))
        text.text = value
        field.append(text)
        form.append(field)
    return form


def test_config_form_round_trip_and_validation() -> None:
    config = RoomConfig()
    new = forms.apply_form(
        config,
        _submit(
            **{
                "muc#roomconfig_persistentroom": "1",
                "muc#roomconfig_membersonly": "true",
                "muc#roomconfig_passwordprotectedroom": "1",
                "muc#roomconfig_roomsecret": "pw",
                "muc#roomconfig_maxusers": "99999",
                "muc#roomconfig_whois": "anyone",
                "x-unknown#field": "ignored",
            }
        ),
        max_limit=500,
    )
    assert new.persistent and new.members_only and new.password == "pw"
    assert new.max_occupants == 500 and new.whois == "anyone"
    assert new.public == config.public  # fields left out keep their value
    # The form offered shows the values back.
    form = forms.config_form(new, 500)
    values = {
        f.get("var"): f.findtext(qn(forms.NS_DATA, "value"))
        for f in form.findall(qn(forms.NS_DATA, "field"))
    }
    assert values["muc#roomconfig_membersonly"] == "1"
    assert values["muc#roomconfig_passwordprotectedroom"] == "1"
    with pytest.raises(StanzaError):
        forms.apply_form(config, _submit(**{"muc#roomconfig_passwordprotectedroom": "1"}), 10)
    with pytest.raises(StanzaError):
        forms.apply_form(config, _submit(**{"muc#roomconfig_whois": "everyone"}), 10)
    assert RoomConfig.from_dict({**new.to_dict(), "from_the_future": 1}) == new
