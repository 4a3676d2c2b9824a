"""The room configuration form (XEP-0045 §10.2, muc#roomconfig in XEP-0004 data forms) and
the room information form (muc#roominfo, §15.5.4) shown in disco#info."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

from xmpp_server.errors import BadRequest, NotAcceptable
from xmpp_server.modules.muc.room import RoomConfig
from xmpp_server.stanza import qn
from xmpp_server.xml import Element

NS_DATA = "jabber:x:data"
FORM_CONFIG = "http://jabber.org/protocol/muc#roomconfig"
FORM_INFO = "http://jabber.org/protocol/muc#roominfo"
P = "muc#roomconfig_"

# var → (attribute, field type, label, options for list-single)
_FIELDS: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    (f"{P}roomname", "name", "text-single", "Room name", ()),
    (f"{P}roomdesc", "description", "text-single", "Description", ()),
    (f"{P}persistentroom", "persistent", "boolean", "Keep the room when it is empty", ()),
    (f"{P}publicroom", "public", "boolean", "List the room in the directory", ()),
    (f"{P}membersonly", "members_only", "boolean", "Only members may enter", ()),
    (f"{P}moderatedroom", "moderated", "boolean", "Only participants may speak", ()),
    (f"{P}passwordprotectedroom", "", "boolean", "A password is needed to enter", ()),
    (f"{P}roomsecret", "password", "text-private", "Password", ()),
    (f"{P}maxusers", "max_occupants", "list-single", "Most occupants", ()),
    (
        f"{P}whois",
        "whois",
        "list-single",
        "Who may see occupants' real JIDs",
        ("moderators", "anyone"),
    ),
    (
        f"{P}allowpm",
        "allow_pm",
        "list-single",
        "Who may send private messages",
        ("anyone", "participants", "moderators", "none"),
    ),
    (f"{P}changesubject", "change_subject", "boolean", "Participants may change the subject", ()),
    (f"{P}allowinvites", "allow_invites", "boolean", "Members may invite others", ()),
    (f"{P}enablearchiving", "archive", "boolean", "Archive messages (MAM)", ()),
    ("muc#roomconfig_enablelogging", "archive", "boolean", "Log the room", ()),
]
_MAX_USERS = ("10", "20", "50", "100", "200", "500", "1000", "5000")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false", ""):
        return False
    raise BadRequest(f"not a boolean: {text!r}")


def _field(form: Element, var: str, kind: str, label: str, values: list[str]) -> Element:
    el = ET.SubElement(form, qn(NS_DATA, "field"), {"var": var, "type": kind, "label": label})
    for value in values:
        ET.SubElement(el, qn(NS_DATA, "value")).text = value
    return el


def config_form(config: RoomConfig, max_limit: int) -> Element:
    form = Element(qn(NS_DATA, "x"), {"type": "form"})
    ET.SubElement(form, qn(NS_DATA, "title")).text = "Room configuration"
    hidden = ET.SubElement(form, qn(NS_DATA, "field"), {"var": "FORM_TYPE", "type": "hidden"})
    ET.SubElement(hidden, qn(NS_DATA, "value")).text = FORM_CONFIG
    for var, attr, kind, label, choices in _FIELDS:
        if var == "muc#roomconfig_enablelogging":
            continue  # the older name of enablearchiving: accepted, not offered
        if var.endswith("passwordprotectedroom"):
            value: Any = bool(config.password)
        else:
            value = getattr(config, attr)
        text = ("1" if value else "0") if kind == "boolean" else str(value)
        el = _field(form, var, kind, label, [text])
        if var.endswith("maxusers"):
            choices = tuple(c for c in _MAX_USERS if int(c) <= max_limit) or (str(max_limit),)
        for choice in choices:
            option = ET.SubElement(el, qn(NS_DATA, "option"), {"label": choice})
            ET.SubElement(option, qn(NS_DATA, "value")).text = choice
    return form


def apply_form(config: RoomConfig, form: Element, max_limit: int) -> RoomConfig:
    """A submitted form over ``config``: fields left out keep their value (§10.2)."""
    if form.get("type") != "submit":
        raise BadRequest("expected a form of type 'submit'")
    changes: dict[str, Any] = {}
    protected: bool | None = None
    known = {var: (attr, kind) for var, attr, kind, _, _ in _FIELDS}
    for fld in form.findall(qn(NS_DATA, "field")):
        var = fld.get("var", "")
        values = [(v.text or "") for v in fld.findall(qn(NS_DATA, "value"))]
        if var == "FORM_TYPE":
            if values and values[0].strip() != FORM_CONFIG:
                raise BadRequest(f"FORM_TYPE must be {FORM_CONFIG}")
            continue
        if var not in known:
            continue  # fields of other servers' forms are ignored, like Prosody does
        attr, kind = known[var]
        value = values[0] if values else ""
        if var.endswith("passwordprotectedroom"):
            protected = _bool(value)
        elif kind == "boolean":
            changes[attr] = _bool(value)
        elif attr == "max_occupants":
            text = value.strip().lower()
            number = 0 if text in ("", "none") else _int(text)
            if number == 0 or number > max_limit:
                number = max_limit
            changes[attr] = number
        elif attr == "whois":
            if value not in ("moderators", "anyone"):
                raise NotAcceptable(f"whois must be moderators or anyone, not {value!r}")
            changes[attr] = value
        elif attr == "allow_pm":
            if value not in ("anyone", "participants", "moderators", "none"):
                raise NotAcceptable(f"unknown allowpm value {value!r}")
            changes[attr] = value
        else:
            changes[attr] = value.strip() if attr != "password" else value
    new = replace(config, **changes)
    if protected is False:
        new = replace(new, password="")
    elif protected and not new.password:
        raise NotAcceptable("a password-protected room needs muc#roomconfig_roomsecret")
    return new


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"not a number: {text!r}") from None
    if value < 0:
        raise BadRequest(f"not a number of occupants: {text!r}")
    return value


def info_form(config: RoomConfig, subject: str, occupants: int) -> Element:
    form = Element(qn(NS_DATA, "x"), {"type": "result"})
    hidden = ET.SubElement(form, qn(NS_DATA, "field"), {"var": "FORM_TYPE", "type": "hidden"})
    ET.SubElement(hidden, qn(NS_DATA, "value")).text = FORM_INFO
    _field(form, "muc#roominfo_description", "text-single", "Description", [config.description])
    _field(form, "muc#roominfo_subject", "text-single", "Subject", [subject])
    _field(form, "muc#roominfo_occupants", "text-single", "Occupants", [str(occupants)])
    _field(form, f"{P}roomname", "text-single", "Name", [config.name])
    return form
