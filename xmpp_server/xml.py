"""Incremental, restricted XML for XMPP streams (RFC 6120 §11).

``XmlStreamParser`` is fed raw bytes and returns events: the stream header, each
complete top-level element (a stanza or a negotiation element) and the stream
end. It refuses what RFC 6120 §11.1 forbids (DTDs, entity declarations,
comments, processing instructions) and enforces byte, depth and attribute limits
while parsing: every byte it holds (a half-read stream header or start tag included)
counts against a budget, so nothing is buffered without bound. It accepts only UTF-8
and only namespace names ElementTree-based clients can read back (no ``}``).
The serializer writes elements back with minimal namespace declarations, as
well-formed XML 1.0 whatever the strings in the tree hold.
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

# Feed expat in slices so size limits are checked while a huge chunk is parsed (a slice
# never takes the parser more than one byte past its budget, see ``feed``).
_SLICE = 16384
# Character data is collected in a buffer of this size before a callback (expat's default
# is 8 KiB, per parser): longer text arrives in several pieces, which _text joins.
TEXT_BUFFER = 1024
_HANDLERS = (
    "StartElementHandler",
    "EndElementHandler",
    "CharacterDataHandler",
    "StartNamespaceDeclHandler",
    "XmlDeclHandler",
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
    """Per-stream parser limits; docs/limits.md lists each with the stream error it gives."""

    # Bytes a parser may hold at once: the stanza being read, or a half-read start tag or
    # stream header. ``max_stanza_size_before_auth`` applies until SASL succeeds.
    max_stanza_size: int = 262144
    max_stanza_size_before_auth: int = 16384
    max_depth: int = 32
    # Attributes and namespace declarations (``xmlns``, ``xmlns:p``) on one element.
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

# A parsed element costs memory beyond its bytes (measured with tracemalloc: ~80 bytes for
# an Element, ~330 with an attribute dict), so each counts this much against the budget on
# top of its bytes: 16 KiB of ``<a/>`` would otherwise hold 330 KiB. Rounded down, so
# ordinary stanzas (a few dozen elements) barely notice.
ELEMENT_COST = 64
ATTRIBUTES_COST = 256


class XmlStreamParser:
    """Sans-IO parser for one XML stream; create a new one on stream restart.

    ``budget`` is the most bytes it may hold (default ``limits.max_stanza_size``); a
    stream before authentication passes ``limits.max_stanza_size_before_auth``."""

    def __init__(self, limits: XmlLimits | None = None, *, budget: int | None = None) -> None:
        self.limits = limits or XmlLimits()
        self.budget = self.limits.max_stanza_size if budget is None else budget
        p = expat.ParserCreate("UTF-8", " ", intern=None)
        p.buffer_text = True
        p.buffer_size = TEXT_BUFFER  # allocated per parser, i.e. per idle session
        p.ordered_attributes = False
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartNamespaceDeclHandler = self._ns_decl
        p.XmlDeclHandler = self._xml_decl
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
        self._ns_count = 0  # namespace declarations on the element being started
        self._fed = 0
        # Byte offset from which input is still held: the start of the stanza being read,
        # else the end of the last thing handled (header, stanza, whitespace). Everything
        # fed after it (expat's unparsed tail, the stanza's tree) counts against the budget.
        self._mark = 0
        # What the current stanza's tree costs beyond its bytes (ELEMENT_COST, ATTRIBUTES_COST).
        self._charge = 0
        self._closed = False

    @property
    def held(self) -> int:
        """Bytes of input this parser holds now (0 once the stream is over)."""
        return 0 if self._closed else self._fed - self._mark + self._charge

    def release(self) -> None:
        """Let go of expat at once. Its handlers are this object's methods, and that cycle
        kept every replaced parser (and expat's buffers, ~20 KiB) alive until a full garbage
        collection: one dead parser per login, found with tracemalloc.

        Never raises: replacing the text handler makes pyexpat flush buffered text through
        the old one (``abc`` after a stanza would raise "text outside of a stanza" here),
        so ``_text`` ignores everything once ``_closed`` is set."""
        self._closed = True
        p = self._parser
        for handler in _HANDLERS:
            try:
                setattr(p, handler, None)
            except Exception:  # teardown must go on; there is nothing to report
                pass

    def feed(self, data: bytes) -> list[XmlEvent]:
        """Parse ``data``; return the events it completed. Raises :class:`StreamError`."""
        if self._closed:
            return []
        events = self._events = []
        if self._fed < 4:
            self._check_encoding(data)
        budget = self.budget
        parse = self._parser.Parse
        off, end = 0, len(data)
        try:
            while off < end and not self._closed:
                # Never more than one byte past the budget: refused the moment it is over.
                size = min(_SLICE, budget + 1 - (self._fed - self._mark + self._charge))
                piece = data if off == 0 and size >= end else data[off : off + size]
                off += len(piece)
                self._fed += len(piece)
                parse(piece, False)
                if self._fed - self._mark + self._charge > budget and not self._closed:
                    raise StreamError("policy-violation", f"more than {budget} bytes held")
        except expat.ExpatError as exc:
            raise StreamError("not-well-formed", expat.errors.messages[exc.code]) from None
        return events

    def _check_encoding(self, data: bytes) -> None:
        """RFC 6120 §11.6: UTF-8 only. A byte order mark or the NULs of UTF-16/32 in the
        first bytes get ``unsupported-encoding`` now rather than confusing expat (which
        would switch to UTF-16 on a BOM) or waiting for the idle timeout."""
        head = data[: 4 - self._fed]
        if b"\x00" in head or (self._fed == 0 and head[:1] in (b"\xef", b"\xfe", b"\xff")):
            raise StreamError("unsupported-encoding", "only UTF-8 without a BOM is accepted")

    # -- expat callbacks -------------------------------------------------------------

    def _restricted(self, *args: Any) -> None:
        raise StreamError("restricted-xml", "DTDs, entities, comments and PIs are not allowed")

    def _restricted_entity(self, *args: Any) -> int:
        self._restricted()
        return 0

    def _xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamError("unsupported-encoding", f"{encoding} is not UTF-8")

    def _ns_decl(self, prefix: str | None, uri: str | None) -> None:
        # A declaration is an attribute too: 10,000 of them on one element were accepted.
        self._ns_count += 1
        if self._ns_count > self._max_attributes:
            raise StreamError("policy-violation", "too many attributes")
        if uri is None:  # xmlns='' undeclares the default namespace
            uri = ""
        if len(uri) > self._max_attribute_value:
            raise StreamError("policy-violation", "attribute value too long")
        if "}" in uri:
            # ElementTree names are "{ns}local": with a "}" in ns, no ElementTree-based
            # client (slixmpp) can read the name back, so forwarding it would disconnect
            # the recipient. Refused at the source.
            raise StreamError("bad-format", "a namespace name must not contain '}'")
        if self._depth == 0 and prefix is None:
            self._default_ns = uri

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        if self._ns_count:
            declared, self._ns_count = self._ns_count, 0
            if len(attrs) + declared > self._max_attributes:
                raise StreamError("policy-violation", "too many attributes")
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
            self._mark = max(self._mark, self._parser.CurrentByteIndex)
            return
        if depth > self._max_depth:
            raise StreamError("policy-violation", "elements nested too deeply")
        if self._text_parts:
            self._flush_text()
        if depth == 1:
            start = self._parser.CurrentByteIndex
            if start > self._mark:
                self._mark = start
            self._charge = 0
            element = Element(tag, attrs)
        else:
            element = ET.SubElement(self._stack[-1], tag, attrs)
        self._stack.append(element)
        self._charge += ATTRIBUTES_COST if attrs else ELEMENT_COST
        if self._charge > self.budget:
            raise StreamError("policy-violation", f"more than {self.budget} bytes held")

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
            self._mark = max(self._mark, self._parser.CurrentByteIndex)
            self._charge = 0
            self._events.append(ElementReceived(element))

    def _text(self, data: str) -> None:
        if self._stack:
            self._text_parts.append(data)
        elif self._closed:
            return  # flushed by release() or after the stream ended: nobody is listening
        elif self._depth == 1:
            if data.strip():
                raise StreamError("not-well-formed", "text outside of a stanza")
            # Whitespace between stanzas (keepalives) is dropped, not held.
            self._mark = max(self._mark, self._parser.CurrentByteIndex)

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
# Characters XML 1.0 does not allow at all (most C0 controls, lone surrogates, U+FFFE/U+FFFF)
# cannot be escaped either; the parser never yields them, but strings the server builds
# (stored data, error texts) might hold them, so they are written as U+FFFD.
_NOT_XML = "[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"
_ILLEGAL = re.compile(_NOT_XML)
_TEXT_SPECIAL = re.compile("[&<>\r]|" + _NOT_XML)
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


_ATTR_SPECIAL = re.compile('[&<>"\n\r\t]|' + _NOT_XML)


# Most text and attribute values need no escaping; looking is far cheaper than translate().
def escape_text(text: str) -> str:
    if _TEXT_SPECIAL.search(text) is None:
        return text
    return _ILLEGAL.sub("\ufffd", text).translate(_TEXT_ESCAPES)


def escape_attr(text: str) -> str:
    if _ATTR_SPECIAL.search(text) is None:
        return text
    return _ILLEGAL.sub("\ufffd", text).translate(_ATTR_ESCAPES)


_SPLITS: dict[str, tuple[str, str]] = {}  # bounded like _QNAMES


def _split(tag: str) -> tuple[str, str]:
    """``{ns}local`` -> (ns, local), split at the last ``}``: a local name never holds one
    (the first ``}`` turned ``{urn:a}b}x`` into the ill-formed ``<b}x xmlns="urn:a"/>``)."""
    parts = _SPLITS.get(tag)
    if parts is not None:
        return parts
    if tag[:1] == "{":
        ns, _, local = tag[1:].rpartition("}")
        parts = ns, local
    else:
        parts = "", tag
    if len(_SPLITS) < _QNAMES_MAX:
        _SPLITS[tag] = parts
    return parts


def _write(el: Element, parent_ns: str, out: list[str]) -> None:
    ns, local = _split(el.tag)
    if ns == NS_STREAMS or ns == NS_XML:
        # The stream header declares the ``stream:`` prefix and ``xml:`` is always bound
        # (it may not be declared as a default namespace); children keep the default ns.
        local = ("stream:" if ns == NS_STREAMS else "xml:") + local
        ns = parent_ns
    out.append("<" + local)
    if ns != parent_ns:
        out.append(f' xmlns="{escape_attr(ns)}"')
    if el.attrib:
        prefixes: dict[str, str] | None = None  # one prefix per attribute namespace
        for key, value in el.attrib.items():
            if key[:1] == "{":
                ans, alocal = _split(key)
                if ans == NS_XML:
                    key = "xml:" + alocal
                else:
                    if prefixes is None:
                        prefixes = {}
                    prefix = prefixes.get(ans)
                    if prefix is None:
                        prefix = prefixes[ans] = f"ns{len(prefixes) + 1}"
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


# For XML the server wrote itself (stored messages, PEP items): client limits were applied
# when it came in, and serialising may add declarations (``xmlns``, ``xmlns:nsN``).
STORED_LIMITS = XmlLimits(max_stanza_size=1 << 30, max_depth=1000, max_attributes=1 << 20)


def fromstring(text: str | bytes) -> Element:
    """Parse one standalone element with the same restrictions as a stream (for stored XML)."""
    data = text.encode() if isinstance(text, str) else text
    parser = XmlStreamParser(STORED_LIMITS)
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
