"""Stanza helpers over ElementTree elements: addressing, replies and error replies.

Stanzas stay plain ``Element`` objects (cheap to route and serialise); these
functions give them the few typed operations routing needs.
"""

from __future__ import annotations

import itertools
import os
import xml.etree.ElementTree as ET

from xmpp_server.errors import NS_STANZA_ERRORS, BadRequest, StanzaError
from xmpp_server.jid import JID
from xmpp_server.xml import NS_CLIENT, XML_LANG, Element

MESSAGE = f"{{{NS_CLIENT}}}message"
PRESENCE = f"{{{NS_CLIENT}}}presence"
IQ = f"{{{NS_CLIENT}}}iq"
STANZA_TAGS = frozenset({MESSAGE, PRESENCE, IQ})
KIND = {MESSAGE: "message", PRESENCE: "presence", IQ: "iq"}

_ids = itertools.count(1)
_id_prefix = os.urandom(4).hex()


def new_id() -> str:
    """A process-unique id for stanzas the server originates."""
    return f"{_id_prefix}-{next(_ids)}"


IQ_TYPES = frozenset({"get", "set", "result", "error"})
IQ_ERROR = f"{{{NS_CLIENT}}}error"


def check_client_stanza(stanza: Element) -> StanzaError | None:
    """What is wrong with a stanza a client sent, by RFC 6120 §8.2.3, or None.

    An iq needs an ``id`` and a known ``type``; a get or set carries exactly one child (the
    request), a result at most one, an error an ``<error/>``. The caller answers the error
    with ``bad-request``, except to a result or an error, which are never answered (no error
    loops): a malformed one is dropped."""
    if stanza.tag != IQ:
        return None
    type_ = stanza.get("type")
    if not stanza.get("id"):
        return BadRequest("an iq needs an 'id'")
    if type_ not in IQ_TYPES:
        return BadRequest("an iq's 'type' is get, set, result or error")
    children = len(stanza)
    if type_ in ("get", "set") and children != 1:
        return BadRequest(f"an iq {type_} carries exactly one child element")
    if type_ == "result" and children > 1:
        return BadRequest("an iq result carries at most one child element")
    if type_ == "error" and stanza.find(IQ_ERROR) is None:
        return BadRequest("an iq error carries an <error/> element")
    return None


def qn(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


def make(
    kind: str,
    *,
    to: JID | str | None = None,
    from_: JID | str | None = None,
    type: str | None = None,
    id: str | None = None,
) -> Element:
    el = Element(qn(NS_CLIENT, kind))
    if to is not None:
        el.set("to", str(to))
    if from_ is not None:
        el.set("from", str(from_))
    if type is not None:
        el.set("type", type)
    if id is not None:
        el.set("id", id)
    return el


def child(el: Element, ns: str, local: str) -> Element | None:
    return el.find(qn(ns, local))


def payload(el: Element) -> Element | None:
    """The first child of an iq: the element that names the request."""
    for sub in el:
        if sub.tag != f"{{{NS_CLIENT}}}error":
            return sub
    return None


def jid_attr(el: Element, name: str) -> JID | None:
    """Parse the ``to``/``from`` attribute; raise JidMalformed-worthy ``ValueError``."""
    value = el.get(name)
    return JID.parse(value) if value else None


def iq_result(iq: Element, *payloads: Element) -> Element:
    """The ``type='result'`` answer to ``iq`` (addresses swapped)."""
    reply = make("iq", type="result", id=iq.get("id", ""))
    if iq.get("from"):
        reply.set("to", iq.get("from", ""))
    if iq.get("to"):
        reply.set("from", iq.get("to", ""))
    reply.extend(payloads)
    return reply


def error_reply(stanza: Element, error: StanzaError, by: str | None = None) -> Element:
    """The error answer to ``stanza`` (RFC 6120 §8.3): original children kept, addresses swapped."""
    attrs: dict[str, str] = {}
    if to := stanza.get("from"):
        attrs["to"] = to
    attrs.update((k, v) for k, v in stanza.attrib.items() if k not in ("to", "from"))
    attrs["type"] = "error"
    if frm := stanza.get("to"):
        attrs["from"] = frm
    reply = Element(stanza.tag, attrs)
    if stanza.tag != IQ:
        reply.extend(list(stanza))
    elif (first := payload(stanza)) is not None:
        reply.append(first)
    err = ET.SubElement(reply, qn(NS_CLIENT, "error"), {"type": error.type})
    if by:
        err.set("by", by)
    ET.SubElement(err, qn(NS_STANZA_ERRORS, error.condition))
    if error.text:
        text = ET.SubElement(err, qn(NS_STANZA_ERRORS, "text"))
        text.set(XML_LANG, "en")
        text.text = error.text
    err.extend(error.extra)
    return reply


def clone(stanza: Element) -> Element:
    """A shallow copy whose attributes can be changed (``copy.copy`` shares the attribute dict)."""
    out = Element(stanza.tag, dict(stanza.attrib))
    out.text = stanza.text
    out.extend(list(stanza))
    return out


def error_condition(stanza: Element) -> str | None:
    """The defined condition of an error stanza, for tests and logs."""
    err = stanza.find(qn(NS_CLIENT, "error"))
    if err is None:
        return None
    for sub in err:
        if sub.tag.startswith(f"{{{NS_STANZA_ERRORS}}}") and not sub.tag.endswith("}text"):
            return sub.tag.rpartition("}")[2]
    return None


def iq_addresses(iq: Element) -> tuple[JID, JID]:
    """(requester's full JID, the account addressed): an iq without 'to' is for the
    sender's own account. The router has stamped 'from' and validated 'to'."""
    requester = JID.parse(iq.get("from", ""))
    to = iq.get("to")
    return requester, JID.parse(to).bare if to else requester.bare
