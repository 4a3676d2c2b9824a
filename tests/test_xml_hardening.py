"""Issue 13 on bytes: what the parser accepts goes out well-formed, every byte it holds counts
against a budget, only UTF-8 gets in, and releasing a parser never raises (sans-IO, no sockets).
"""

from __future__ import annotations

import gc
import tracemalloc
import xml.etree.ElementTree as ET
from xml.parsers import expat

import pytest

from tests.helpers import feed_bytewise
from tests.test_stream import HEADER as CLIENT_HEADER
from tests.test_stream import authenticate, new_stream
from xmpp_server import stream as st
from xmpp_server.errors import StreamError
from xmpp_server.xml import (
    ElementReceived,
    XmlLimits,
    XmlStreamParser,
    fromstring,
    tobytes,
    tostring,
)

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>"
)


def error_of(data: bytes, parser: XmlStreamParser | None = None, *, bytewise: bool = False) -> str:
    parser = parser or XmlStreamParser()
    with pytest.raises(StreamError) as caught:
        if bytewise:
            feed_bytewise(parser.feed, data)
        else:
            parser.feed(data)
    return caught.value.condition


def well_formed(text: str) -> bool:
    """Checked by plain expat without namespace processing, as any XML 1.0 parser would."""
    try:
        expat.ParserCreate("UTF-8").Parse(text.encode("utf-8"), True)
    except expat.ExpatError:
        return False
    return True


# -- defect 1: names, namespaces and characters --------------------------------------


def test_issue_stanza_with_brace_namespace_is_refused_as_bad_format() -> None:
    stanza = b"<message to='bob@d' type='chat'><body>x</body><x xmlns='urn:a}b'/></message>"
    assert error_of(HEADER + stanza) == "bad-format"
    assert error_of(HEADER + stanza, bytewise=True) == "bad-format"


@pytest.mark.parametrize(
    "stanza",
    [
        b"<message xmlns:p='urn:a}b'><p:x/></message>",
        b"<message xmlns:p='urn:a}b' p:attr='1'/>",
        b"<message><x xmlns:p='}' /></message>",
    ],
    ids=["prefixed-element", "prefixed-attribute", "unused-declaration"],
)
def test_any_namespace_with_a_brace_is_refused(stanza: bytes) -> None:
    assert error_of(HEADER + stanza) == "bad-format"


def test_serializer_splits_names_at_the_last_brace() -> None:
    """A tree built in the server (or read from storage) may still hold such a name: the
    output must be well-formed and mean the same (old main wrote ``<b}x xmlns="urn:a"/>``)."""
    el = ET.Element("{jabber:client}message")
    ET.SubElement(el, "{urn:a}b}x", {"{urn:c}d}y": "1"})
    text = tostring(el)
    assert well_formed(text), text
    assert text == '<message><x xmlns="urn:a}b" xmlns:ns1="urn:c}d" ns1:y="1"/></message>'


@pytest.mark.parametrize("bad", ["\x00", "\x01", "\x0b", "\x1f", "\ud800", "\udfff", "\ufffe"])
def test_characters_xml_forbids_are_never_emitted(bad: str) -> None:
    value = f"a{bad}b"
    el = ET.Element("{jabber:client}message", {"id": value})
    ET.SubElement(el, "{jabber:client}body").text = value
    el[0].tail = value
    data = tobytes(el)  # a lone surrogate used to raise UnicodeEncodeError here
    assert well_formed(data.decode()), data
    again = fromstring(data)
    assert again.get("id") == again[0].text == again[0].tail == "a\ufffdb"


def test_allowed_controls_and_astral_characters_pass_unchanged() -> None:
    value = "tab\there\nnew\rcr \U0001f600 \ufffd"
    el = ET.Element("{jabber:client}message", {"id": value})
    el.text = value
    again = fromstring(tostring(el))
    assert again.get("id") == value and again.text == value


def test_many_namespaced_attributes_share_one_declaration_per_namespace() -> None:
    """Serialising must not inflate declarations past what a stored row can be read with."""
    el = ET.Element("{jabber:client}message", {f"{{urn:x}}a{i}": str(i) for i in range(60)})
    text = tostring(el)
    assert text.count("xmlns:") == 1
    assert fromstring(text).attrib == el.attrib


# -- defect 8: xmlns declarations are attributes; UTF-8 only --------------------------


def test_namespace_declarations_count_as_attributes() -> None:
    decls = b" ".join(b"xmlns:p%d='urn:%d'" % (i, i) for i in range(10_000))
    assert error_of(HEADER + b"<message " + decls + b"/>") == "policy-violation"
    limits = XmlLimits(max_attributes=4)  # the header has two of each
    three_and_two = b"<message a='1' b='2' c='3' xmlns:p='urn:p' xmlns:q='urn:q'/>"
    assert error_of(HEADER + three_and_two, XmlStreamParser(limits)) == "policy-violation"
    two_and_two = b"<message a='1' b='2' xmlns:p='urn:p' xmlns:q='urn:q'/>"
    assert len(XmlStreamParser(limits).feed(HEADER + two_and_two)) == 2


def test_namespace_name_length_is_an_attribute_value_length() -> None:
    long_ns = b"<message><x xmlns='urn:" + b"a" * 5000 + b"'/></message>"
    assert error_of(HEADER + long_ns) == "policy-violation"


UTF16_HEADER = HEADER.decode().replace("<?xml version='1.0'?>", "")


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf" + HEADER,
        "\ufeff".encode("utf-16-le") + UTF16_HEADER.encode("utf-16-le"),
        "\ufeff".encode("utf-16-be") + UTF16_HEADER.encode("utf-16-be"),
        UTF16_HEADER.encode("utf-16-le"),
        UTF16_HEADER.encode("utf-32-be"),
        b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:],
        b"<?xml version='1.0' encoding='UTF-16'?>" + HEADER[21:],
    ],
    ids=["utf8-bom", "utf16le-bom", "utf16be-bom", "utf16le", "utf32be", "latin1", "utf16-decl"],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_anything_but_utf8_gets_unsupported_encoding_at_once(data: bytes, bytewise: bool) -> None:
    assert error_of(data, bytewise=bytewise) == "unsupported-encoding"


def test_utf8_declarations_are_fine() -> None:
    for decl in (b"encoding='UTF-8'", b'encoding="utf-8"', b""):
        data = b"<?xml version='1.0' " + decl + b"?>" + HEADER[21:]
        assert len(XmlStreamParser().feed(data)) == 1


def test_stream_answers_unsupported_encoding_with_its_own_header() -> None:
    stream = new_stream()
    events = stream.receive_data("\ufeff".encode("utf-16-le") + UTF16_HEADER.encode("utf-16-le"))
    assert len(events) == 1 and isinstance(events[0], st.StreamEnded)
    out = stream.data_to_send()
    assert out.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert b"<unsupported-encoding " in out and out.endswith(b"</stream:stream>")


# -- defect 4 (parser side): release never raises --------------------------------------


def test_release_never_raises_after_text_outside_a_stanza() -> None:
    """expat keeps ``abc`` buffered when ``</x>`` fails; replacing the text handler flushed
    it through ``_text``, which raised "text outside of a stanza" out of the teardown."""
    parser = XmlStreamParser()
    parser.feed(HEADER)
    assert error_of(b"<presence/>abc</x>", parser) == "not-well-formed"
    parser.release()
    assert parser.feed(b"more") == []


def test_stream_teardown_after_a_stream_error_never_raises() -> None:
    stream = new_stream()
    authenticate(stream)
    bind = b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    events = stream.receive_data(CLIENT_HEADER + bind)
    assert isinstance(events[0], st.BindRequested) and stream.jid is not None
    stream.bind_done(events[0].iq, stream.jid)
    events = stream.receive_data(b"<presence/>abc</x>")
    assert isinstance(events[-1], st.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "not-well-formed"
    stream.no_more_input()


# -- defect 2: every byte held counts --------------------------------------------------


def attack_bytes(parser: XmlStreamParser, data: bytes, chunk: int) -> tuple[str | None, int]:
    """Feed ``data`` in chunks until refused; the refusal and the most the parser held."""
    most = 0
    for off in range(0, len(data), chunk):
        try:
            parser.feed(data[off : off + chunk])
        except StreamError as exc:
            return exc.condition, most
        most = max(most, parser.held)
    return None, most


@pytest.mark.parametrize("chunk", [1, 7, 1000, 100_000])
@pytest.mark.parametrize(
    "prefix",
    [b"", HEADER, HEADER + b"<message to='a@b'><body>"],
    ids=["unclosed-header", "half-open-start-tag", "open-text"],
)
def test_nothing_is_held_past_the_budget(prefix: bytes, chunk: int) -> None:
    opening = b"<stream:stream to='" if not prefix else b"<message to='"
    if prefix.endswith(b"<body>"):
        opening = b""
    data = prefix + opening + b"A" * 50_000
    parser = XmlStreamParser(budget=10_000)
    condition, most = attack_bytes(parser, data, chunk)
    assert condition == "policy-violation"
    assert most <= 10_000


def test_whitespace_keepalives_are_not_held() -> None:
    parser = XmlStreamParser(budget=1000)
    parser.feed(HEADER)
    for _ in range(5000):
        parser.feed(b" ")
    parser.feed(b"\n" * 50_000)
    assert parser.held < 1000 + len(HEADER)
    assert isinstance(parser.feed(b"<presence/>")[0], ElementReceived)
    assert parser.held <= len(b"<presence/>")


def test_header_and_negotiation_fit_the_small_budget() -> None:
    stream = new_stream()
    authenticate(stream)
    assert not stream.closed


def test_small_budget_before_auth_full_budget_after() -> None:
    limits = XmlLimits(max_stanza_size=100_000, max_stanza_size_before_auth=5000)
    before = new_stream(limits=limits)
    before.receive_data(CLIENT_HEADER)
    events = before.receive_data(b"<message to='" + b"A" * 6000)
    assert isinstance(events[-1], st.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "policy-violation"
    assert b"<policy-violation " in before.data_to_send()

    after = new_stream(limits=limits)
    authenticate(after)
    after.receive_data(CLIENT_HEADER)
    assert after.receive_data(b"<message to='" + b"A" * 60_000) == []
    assert not after.closed and after.held > 60_000
    events = after.receive_data(b"A" * 50_000)
    assert isinstance(events[-1], st.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "policy-violation"


def held_memory(data: bytes) -> int:
    """Bytes allocated and still alive after a fresh parser was fed ``data`` (tracemalloc
    sees expat's buffers: pyexpat allocates through Python's allocator)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        parser = XmlStreamParser()  # noqa: F841 - kept alive while measuring
        for off in range(0, len(data), 512):
            parser.feed(data[off : off + 512])
        after = tracemalloc.take_snapshot()
        return sum(s.size_diff for s in after.compare_to(before, "filename"))
    finally:
        tracemalloc.stop()


def test_memory_held_per_connection_is_about_the_bytes_held() -> None:
    """A connection just under the 16 KiB pre-auth budget (an unclosed ``<message to='``)
    holds a few times its bytes at most: expat's doubling buffer, nothing per byte."""
    budget = XmlLimits().max_stanza_size_before_auth
    data = HEADER + b"<message to='" + b"A" * (budget - 100)
    memory = held_memory(data)
    assert memory < 4 * budget + 64 * 1024, memory


@pytest.mark.parametrize(
    "stanza",
    [
        b"<message><x xmlns=''><y/></x></message>",
        b"<message><xml:x xml:lang='en'/></message>",
        b"<message><stream:x><y/></stream:x></message>",
    ],
    ids=["undeclared-default", "xml-prefixed-element", "stream-prefixed-element"],
)
def test_reserved_and_empty_namespaces_round_trip(stanza: bytes) -> None:
    """Found by the round-trip fuzzer: ``xmlns=''`` and an element in the ``xml:`` namespace
    (which may not be declared as a default namespace) must come back as they went in."""
    events = XmlStreamParser().feed(HEADER + stanza)
    element = events[-1].element  # type: ignore[union-attr]
    text = tostring(element)
    assert well_formed(text), text
    again = fromstring(text)
    assert ET.tostring(again) == ET.tostring(element)


def test_component_stream_has_the_small_budget_until_its_handshake() -> None:
    from xmpp_server.component import ComponentStream

    limits = XmlLimits(max_stanza_size=100_000, max_stanza_size_before_auth=5000)
    stream = ComponentStream({"push.example.org": "s3cret"}, limits)
    stream.receive_data(
        b"<stream:stream xmlns='jabber:component:accept' "
        b"xmlns:stream='http://etherx.jabber.org/streams' to='push.example.org'>"
    )
    stream.receive_data(b"<handshake>" + b"A" * 6000)
    assert stream.closed
    assert b"<policy-violation " in stream.data_to_send()
