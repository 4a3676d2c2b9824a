"""Serializer/parser round trip (issue 13, defect 1): whatever the parser accepts, the
serializer writes as well-formed XML that parses back to the same tree; and any tree the
server builds (arbitrary strings in text and attributes) is written well-formed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat

from hypothesis import assume, given
from hypothesis import strategies as st

from xmpp_server.errors import StreamError
from xmpp_server.xml import NS_XML, ElementReceived, XmlStreamParser, fromstring, tostring

HEADER = (
    b"<stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>"
)
NAME = st.from_regex(r"[A-Za-z_\u00c0-\u00d6][A-Za-z0-9_.\-\u00b7\u0300]{0,5}", fullmatch=True)
# Namespace names: anything, the characters that matter most made likely.
NS = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["", "jabber:client", "urn:a}b", "}", "{", "urn:x", NS_XML,
                     "http://etherx.jabber.org/streams", "a b", "&<>\"'"]),
)
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\r\n", "]]>", "&amp;"]))
PREFIX = st.sampled_from([None, "p", "q", "xml", "stream", "xmlns"])


def attr_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def text_escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def element_source(draw: st.DrawFn, depth: int = 0) -> str:
    """XML text for one element: random prefixes, declarations, attributes and text,
    escaped as a client would (or not quite: expat decides what it accepts)."""
    prefix = draw(PREFIX)
    name = draw(NAME)
    tag = f"{prefix}:{name}" if prefix else name
    parts = [tag]
    for _ in range(draw(st.integers(0, 2))):
        decl_prefix = draw(st.sampled_from(["", "p", "q"]))
        decl = f"xmlns:{decl_prefix}" if decl_prefix else "xmlns"
        parts.append(f"{decl}='{attr_escape(draw(NS))}'")
    for i in range(draw(st.integers(0, 3))):
        attr_prefix = draw(PREFIX)
        attr = f"{attr_prefix}:{draw(NAME)}{i}" if attr_prefix else f"{draw(NAME)}{i}"
        parts.append(f"{attr}='{attr_escape(draw(TEXT))}'")
    body = text_escape(draw(TEXT))
    if depth < 3:
        for _ in range(draw(st.integers(0, 2))):
            body += draw(element_source(depth + 1)) + text_escape(draw(TEXT))
    if not body and draw(st.booleans()):
        return f"<{' '.join(parts)}/>"
    return f"<{' '.join(parts)}>{body}</{tag}>"


def same(a: ET.Element, b: ET.Element) -> bool:
    return (
        a.tag == b.tag
        and a.attrib == b.attrib
        and (a.text or "") == (b.text or "")
        and (a.tail or "") == (b.tail or "")
        and len(a) == len(b)
        and all(same(x, y) for x, y in zip(a, b, strict=True))
    )


def well_formed(text: str) -> None:
    """Plain expat, no namespace processing: XML 1.0 well-formedness only."""
    expat.ParserCreate("UTF-8").Parse(text.encode("utf-8"), True)


@given(element_source())
def test_whatever_the_parser_accepts_round_trips(source: str) -> None:
    try:
        events = XmlStreamParser().feed(HEADER + source.encode("utf-8", "surrogatepass"))
    except StreamError:
        return
    elements = [e.element for e in events if isinstance(e, ElementReceived)]
    assume(elements)
    original = elements[0]
    written = tostring(original)
    well_formed(written)
    assert same(fromstring(written), original), written


LEGAL_NS = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="} \ufffe\uffff"
    ),
    max_size=10,
).filter(lambda ns: ns not in (NS_XML, "http://www.w3.org/2000/xmlns/"))


@st.composite
def tree(draw: st.DrawFn, depth: int = 0) -> ET.Element:
    """A tree built in the server: names valid, every string arbitrary (controls, lone
    surrogates, U+FFFE included). Namespace names hold no '}' (refused as bad-format) and no
    space (expat's namespace separator, so not-well-formed on input)."""
    ns = draw(LEGAL_NS)
    el = ET.Element(f"{{{ns}}}{draw(NAME)}" if ns else draw(NAME))
    for i in range(draw(st.integers(0, 3))):
        ans = draw(st.one_of(st.just(""), st.just(NS_XML), LEGAL_NS))
        key = f"{draw(NAME)}{i}"
        el.set(f"{{{ans}}}{key}" if ans else key, draw(st.text(max_size=8)))
    el.text = draw(st.one_of(st.none(), st.text(max_size=8)))
    if depth < 3:
        for _ in range(draw(st.integers(0, 2))):
            child = draw(tree(depth + 1))
            child.tail = draw(st.one_of(st.none(), st.text(max_size=8)))
            el.append(child)
    return el


@given(tree())
def test_any_server_built_tree_is_written_well_formed(el: ET.Element) -> None:
    written = tostring(el)
    well_formed(written)
    again = fromstring(written)
    assert again.tag == el.tag and len(again) == len(el)
