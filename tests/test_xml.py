"""The restricted incremental XML parser and the serializer (RFC 6120 §11)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.helpers import feed_bytewise
from xmpp_server.errors import StreamError
from xmpp_server.xml import (
    XML_LANG,
    Element,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XmlLimits,
    XmlStreamParser,
    fromstring,
    tostring,
)

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0' "
    b"xml:lang='en'>"
)
STANZAS = (
    b"<message to='juliet@example.org' type='chat' id='m1'><body>Art thou &lt;here&gt;? "
    b"&amp; \xc3\xa9</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    b"  \n<presence><show>away</show></presence>"
    b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq></stream:stream>"
)


def kinds(events: list[object]) -> list[str]:
    return [type(e).__name__ for e in events]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_stream_events_whole_and_one_byte_at_a_time(bytewise: bool) -> None:
    parser = XmlStreamParser()
    data = HEADER + STANZAS
    events = feed_bytewise(parser.feed, data) if bytewise else parser.feed(data)
    assert kinds(events) == [
        "StreamOpened",
        "ElementReceived",
        "ElementReceived",
        "ElementReceived",
        "StreamClosed",
    ]
    opened = events[0]
    assert isinstance(opened, StreamOpened)
    assert opened.default_ns == "jabber:client"
    assert opened.attrs == {"to": "example.org", "version": "1.0", XML_LANG: "en"}
    message = events[1]
    assert isinstance(message, ElementReceived)
    assert message.element.tag == "{jabber:client}message"
    assert message.element.findtext("{jabber:client}body") == "Art thou <here>? & é"
    assert isinstance(events[-1], StreamClosed)
    # Trailing data after the stream closed is ignored, not an error.
    assert parser.feed(b"<garbage") == []


def test_round_trip_keeps_namespaces_minimal() -> None:
    parser = XmlStreamParser()
    events = parser.feed(HEADER + STANZAS)
    texts = [tostring(e.element) for e in events if isinstance(e, ElementReceived)]
    assert texts[0] == (
        '<message to="juliet@example.org" type="chat" id="m1"><body>Art thou &lt;here&gt;? '
        '&amp; é</body><active xmlns="http://jabber.org/protocol/chatstates"/></message>'
    )
    assert texts[2] == '<iq type="get" id="r1"><query xmlns="jabber:iq:roster"/></iq>'
    again = fromstring(texts[0])
    assert tostring(again) == texts[0]


def test_attribute_escaping_round_trips() -> None:
    element = fromstring("<message id='a&quot;b&lt;&#10;c'/>")
    assert element.get("id") == 'a"b<\nc'
    assert tostring(element) == '<message id="a&quot;b&lt;&#10;c"/>'


def test_xml_lang_and_foreign_attribute_namespaces() -> None:
    element = fromstring("<message xml:lang='de' xmlns:x='urn:x' x:flag='1'/>")
    assert tostring(element) == '<message xml:lang="de" xmlns:ns1="urn:x" ns1:flag="1"/>'


def error_of(data: bytes, limits: XmlLimits | None = None, bytewise: bool = False) -> StreamError:
    parser = XmlStreamParser(limits)
    with pytest.raises(StreamError) as caught:
        if bytewise:
            feed_bytewise(parser.feed, data)
        else:
            parser.feed(data)
    return caught.value


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (b"<!DOCTYPE x [<!ENTITY a 'b'>]>" + HEADER[21:], "restricted-xml"),
        (HEADER + b"<!-- comment -->", "restricted-xml"),
        (HEADER + b"<?pi data?>", "restricted-xml"),
        (HEADER + b"<message><body>&ent;</body></message>", "not-well-formed"),
        (HEADER + b"<message><body></message>", "not-well-formed"),
        (HEADER + b"text between stanzas", "not-well-formed"),
        (b"<stream xmlns='urn:wrong'>", "invalid-namespace"),
        (b"<html>", "not-well-formed"),
        (HEADER + b"<message \xff/>", "not-well-formed"),
    ],
    ids=[
        "doctype",
        "comment",
        "pi",
        "undefined-entity",
        "mismatched-tag",
        "stray-text",
        "wrong-stream-ns",
        "not-a-stream",
        "bad-utf8",
    ],
)
def test_restricted_and_malformed_input(data: bytes, condition: str, bytewise: bool) -> None:
    assert error_of(data, bytewise=bytewise).condition == condition


def test_stanza_size_limit_is_enforced_before_the_stanza_ends() -> None:
    limits = XmlLimits(max_stanza_size=10000)
    parser = XmlStreamParser(limits)
    parser.feed(HEADER)
    parser.feed(b"<message><body>" + b"x" * 9000)
    with pytest.raises(StreamError) as caught:
        parser.feed(b"x" * 2000)
    assert caught.value.condition == "policy-violation"


def test_size_limit_counts_per_stanza_not_per_stream() -> None:
    parser = XmlStreamParser(XmlLimits(max_stanza_size=10000))
    parser.feed(HEADER)
    stanza = b"<message><body>" + b"x" * 6000 + b"</body></message>"
    events = parser.feed(stanza * 20)
    assert len(events) == 20


def test_depth_attribute_count_and_length_limits() -> None:
    limits = XmlLimits(max_depth=5, max_attributes=3, max_attribute_value=1024)
    assert error_of(HEADER + b"<a><b><c><d><e><f/>", limits).condition == "policy-violation"
    attrs = b" ".join(b"a%d='1'" % i for i in range(4))
    assert error_of(HEADER + b"<message " + attrs + b"/>", limits).condition == "policy-violation"
    long_value = b"<message id='" + b"x" * 1025 + b"'/>"
    assert error_of(HEADER + long_value, limits).condition == "policy-violation"


def test_billion_laughs_never_expands() -> None:
    bomb = (
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
        b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>"
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>&lol2;"
    )
    assert error_of(bomb).condition == "restricted-xml"


def test_external_entity_is_refused() -> None:
    xxe = b"<!DOCTYPE x [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]><x>&xxe;</x>"
    assert error_of(xxe).condition == "restricted-xml"


@pytest.mark.parametrize("special", ["&", "<", ">", '"', "\n", "\r", "\t", "'", "plain"])
def test_each_special_character_survives_a_round_trip(special: str) -> None:
    """Serialisation skips escaping for values without specials; each one must still be
    escaped where it appears: in an attribute, in text and in a tail."""
    value = f"a{special}b"
    el = Element("{jabber:client}message", {"id": value})
    body = ET.SubElement(el, "{jabber:client}body")
    body.text = value
    body.tail = value
    again = fromstring(tostring(el))
    assert again.get("id") == value
    assert again[0].text == value and again[0].tail == value
