"""Incremental, restricted XML for XMPP streams (RFC 6120 §11).

``XmlStreamParser`` is fed raw bytes and returns events: the stream header, each
complete top-level element (a stanza or a negotiation element) and the stream
end. It refuses what RFC 6120 §11.1 forbids (DTDs, entity declarations,
comments, processing instructions) and enforces size, depth and attribute limits
while parsing, so an oversized stanza is rejected before it is buffered whole.
The serializer writes elements back with minimal namespace declarations.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from xml.parsers import expat

from xmpp_server.errors import NS_STREAMS, StreamError

NS_CLIENT = "jabber:client"
NS_XML = "http://www.w3.org/XML/1998/namespace"
XML_LANG = f"{{{NS_XML}}}lang"
STREAM_TAG = f"{{{NS_STREAMS}}}stream"

Element = ET.Element

# Feed expat in slices so size limits are checked while a huge chunk is parsed.
_SLICE = 16384
# Character data is collected in a buffer of this size before a callback (expat's default
# is 8 KiB, per parser): longer text arrives in several pieces, which _text joins.
TEXT_BUFFER = 1024
_HANDLERS = (
    "StartElementHandler",
    "EndElementHandler",
    "CharacterDataHandler",
    "StartNamespaceDeclHandler",
    "StartDoctypeDeclHandler",
    "EntityDeclHandler",
    "UnparsedEntityDeclHandler",
    "NotationDeclHandler",
    "ExternalEntityRefHandler",
    "CommentHandler",
    "ProcessingInstructionHandler",
    "SkippedEntityHandler",
)


@dataclass(frozen=True, slots=True)
class XmlLimits:
    max_stanza_size: int = 262144
    max_depth: int = 32
    max_attributes: int = 64
    max_attribute_value: int = 4096


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """``<stream:stream>`` with its attributes (``xml:lang`` as ``XML_LANG``)."""

    attrs: dict[str, str]
    default_ns: str | None


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to make, one per stanza
class ElementReceived:
    element: Element


@dataclass(frozen=True, slots=True)
class StreamClosed:
    pass


XmlEvent = StreamOpened | ElementReceived | StreamClosed


def _qname(name: str) -> str:
    ns, sep, local = name.rpartition(" ")
    return f"{{{ns}}}{local}" if sep else name


# expat's "ns local" names as ElementTree's "{ns}local": the same few dozen names arrive in
# every stanza, so they are converted once. Bounded, so a client inventing names cannot
# grow it; past the bound names are converted each time.
_QNAMES: dict[str, str] = {}
_QNAMES_MAX = 4096


class XmlStreamParser:
    """Sans-IO parser for one XML stream; create a new one on stream restart."""

    def __init__(self, limits: XmlLimits | None = None) -> None:
        self.limits = limits or XmlLimits()
        p = expat.ParserCreate("UTF-8", " ", intern=None)
        p.buffer_text = True
        p.buffer_size = TEXT_BUFFER  # allocated per parser, i.e. per idle session
        p.ordered_attributes = False
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartNamespaceDeclHandler = self._ns_decl
        p.StartDoctypeDeclHandler = self._restricted
        p.EntityDeclHandler = self._restricted
        p.UnparsedEntityDeclHandler = self._restricted
        p.NotationDeclHandler = self._restricted
        p.ExternalEntityRefHandler = self._restricted_entity
        p.CommentHandler = self._restricted
        p.ProcessingInstructionHandler = self._restricted
        p.SkippedEntityHandler = self._restricted
        self._parser = p
        # The limits as plain attributes: _start runs for every element.
        self._max_depth = self.limits.max_depth
        self._max_attributes = self.limits.max_attributes
        self._max_attribute_value = self.limits.max_attribute_value
        self._events: list[XmlEvent] = []
        self._stack: list[Element] = []
        self._text_parts: list[str] = []
        self._depth = 0
        self._default_ns: str | None = None
        self._fed = 0
        self._stanza_start = -1  # byte offset where the current top-level element began
        self._closed = False

    def release(self) -> None:
        """Let go of expat at once. Its handlers are this object's methods, and that cycle
        kept every replaced parser (and expat's buffers, ~20 KiB) alive until a full garbage
        collection: one dead parser per login, found with tracemalloc."""
        p = self._parser
        for handler in _HANDLERS:
            setattr(p, handler, None)
        self._closed = True

    def feed(self, data: bytes) -> list[XmlEvent]:
        """Parse ``data``; return the events it completed. Raises :class:`StreamError`."""
        if self._closed:
            return []
        events = self._events = []
        limit = self.limits.max_stanza_size
        try:
            for off in range(0, len(data), _SLICE):
                piece = data[off : off + _SLICE]
                self._fed += len(piece)
                self._parser.Parse(piece, False)
                if self._stanza_start >= 0 and self._fed - self._stanza_start > limit:
                    raise StreamError("policy-violation", "stanza too large")
        except expat.ExpatError as exc:
            raise StreamError("not-well-formed", expat.errors.messages[exc.code]) from None
        return events

    # -- expat callbacks -------------------------------------------------------------

    def _restricted(self, *args: Any) -> None:
        raise StreamError("restricted-xml", "DTDs, entities, comments and PIs are not allowed")

    def _restricted_entity(self, *args: Any) -> int:
        self._restricted()
        return 0

    def _ns_decl(self, prefix: str | None, uri: str) -> None:
        if self._depth == 0 and prefix is None:
            self._default_ns = uri

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if attrs:
            if len(attrs) > self._max_attributes:
                raise StreamError("policy-violation", "too many attributes")
            if max(map(len, attrs.values())) > self._max_attribute_value:
                raise StreamError("policy-violation", "attribute value too long")
            if " " in "".join(attrs):  # a namespaced attribute
                attrs = {_qname(k): v for k, v in attrs.items()}
        depth = self._depth
        self._depth = depth + 1
        tag = _QNAMES.get(name)
        if tag is None:
            tag = _qname(name)
            if len(_QNAMES) < _QNAMES_MAX:
                _QNAMES[name] = tag
        if depth == 0:
            if tag != STREAM_TAG:
                if tag.endswith("}stream") or tag == "stream":
                    raise StreamError(
                        "invalid-namespace", "stream element not in streams namespace"
                    )
                raise StreamError("not-well-formed", "expected <stream:stream>")
            self._events.append(StreamOpened(dict(attrs), self._default_ns))
            return
        if depth > self._max_depth:
            raise StreamError("policy-violation", "elements nested too deeply")
        if self._text_parts:
            self._flush_text()
        if depth == 1:
            self._stanza_start = self._parser.CurrentByteIndex
            if self._stanza_start < 0:
                self._stanza_start = self._fed
            element = Element(tag, attrs)
        else:
            element = ET.SubElement(self._stack[-1], tag, attrs)
        self._stack.append(element)

    def _end(self, name: str) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._closed = True
            self._events.append(StreamClosed())
            return
        if self._text_parts:
            self._flush_text()
        element = self._stack.pop()
        if not self._stack:
            self._stanza_start = -1
            self._events.append(ElementReceived(element))

    def _text(self, data: str) -> None:
        if self._stack:
            self._text_parts.append(data)
        elif self._depth == 1 and data.strip():
            raise StreamError("not-well-formed", "text outside of a stanza")

    def _flush_text(self) -> None:
        if not self._text_parts:
            return
        text = "".join(self._text_parts)
        self._text_parts.clear()
        current = self._stack[-1]
        if len(current):
            last = current[-1]
            last.tail = (last.tail or "") + text
        else:
            current.text = (current.text or "") + text


# -- serialisation --------------------------------------------------------------------

# A raw CR would come back as LF (XML end-of-line handling), so it is written as a reference.
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\n": "&#10;",
        "\r": "&#13;",
        "\t": "&#9;",
    }
)


_ATTR_SPECIAL = re.compile('[&<>"\n\r\t]')


# Most text and attribute values need no escaping; looking is far cheaper than translate().
def escape_text(text: str) -> str:
    if "&" in text or "<" in text or ">" in text or "\r" in text:
        return text.translate(_TEXT_ESCAPES)
    return text


def escape_attr(text: str) -> str:
    if _ATTR_SPECIAL.search(text) is None:
        return text
    return text.translate(_ATTR_ESCAPES)


_SPLITS: dict[str, tuple[str, str]] = {}  # bounded like _QNAMES


def _split(tag: str) -> tuple[str, str]:
    parts = _SPLITS.get(tag)
    if parts is not None:
        return parts
    if tag[:1] == "{":
        ns, _, local = tag[1:].partition("}")
        parts = ns, local
    else:
        parts = "", tag
    if len(_SPLITS) < _QNAMES_MAX:
        _SPLITS[tag] = parts
    return parts


def _write(el: Element, parent_ns: str, out: list[str]) -> None:
    ns, local = _split(el.tag)
    if ns == NS_STREAMS:
        # The stream header declares the ``stream:`` prefix; children keep the default ns.
        local = "stream:" + local
        ns = parent_ns
    out.append("<" + local)
    if ns != parent_ns:
        out.append(f' xmlns="{escape_attr(ns)}"')
    if el.attrib:
        extra = 0
        for key, value in el.attrib.items():
            if key[:1] == "{":
                ans, alocal = _split(key)
                if ans == NS_XML:
                    key = "xml:" + alocal
                else:
                    extra += 1
                    prefix = f"ns{extra}"
                    out.append(f' xmlns:{prefix}="{escape_attr(ans)}"')
                    key = f"{prefix}:{alocal}"
            out.append(f' {key}="{escape_attr(value)}"')
    if el.text or len(el):
        out.append(">")
        if el.text:
            out.append(escape_text(el.text))
        for child in el:
            _write(child, ns, out)
            if child.tail:
                out.append(escape_text(child.tail))
        out.append(f"</{local}>")
    else:
        out.append("/>")


def tostring(el: Element, parent_ns: str = NS_CLIENT) -> str:
    """Serialise ``el`` as it appears inside a stream whose default namespace is ``parent_ns``."""
    out: list[str] = []
    _write(el, parent_ns, out)
    return "".join(out)


def tobytes(el: Element, parent_ns: str = NS_CLIENT) -> bytes:
    return tostring(el, parent_ns).encode()


def fromstring(text: str | bytes) -> Element:
    """Parse one standalone element with the same restrictions as a stream (for stored XML)."""
    data = text.encode() if isinstance(text, str) else text
    parser = XmlStreamParser(XmlLimits(max_stanza_size=1 << 30, max_depth=1000))
    wrapped = (
        b"<stream:stream xmlns='"
        + NS_CLIENT.encode()
        + b"' xmlns:stream='"
        + NS_STREAMS.encode()
        + b"'>"
        + data
        + b"</stream:stream>"
    )
    for event in parser.feed(wrapped):
        if isinstance(event, ElementReceived):
            return event.element
    raise ValueError("no element in XML text")
