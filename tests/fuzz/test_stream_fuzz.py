"""The sans-IO client stream (xmpp_server.stream over xmpp_server.xml) fed a legal session,
mutated (bytes flipped, cut, spliced, junk inserted) and split at arbitrary points, or plain
arbitrary bytes. Invariants: ``receive_data`` never raises (a ``StreamError`` becomes a stream
error), the parser never holds more than its budget, and everything sent back is well-formed
XML, stream by stream."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from xmpp_server import stream as st_
from xmpp_server.jid import JID
from xmpp_server.sasl import ChannelBindings, make_credentials
from xmpp_server.xml import XmlLimits

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>"
)
CREDS = {c.mechanism: c for c in make_credentials("secret", 4096)}
SESSION = [
    HEADER,
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
    + base64.b64encode(b"\0juliet\0secret")
    + b"</auth>",
    HEADER,
    b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    b"<resource>balcony</resource></bind></iq>",
    b"<enable xmlns='urn:xmpp:sm:3' resume='true'/><r xmlns='urn:xmpp:sm:3'/>",
    b"<presence><show>away</show><status>x &amp; y</status></presence>",
    b"<message to='romeo@example.org' type='chat' id='m1' xml:lang='en'><body>hi &lt;3</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
    b"<a xmlns='urn:xmpp:sm:3' h='0'/>",
    b"</stream:stream>",
]
LIMITS = XmlLimits(max_stanza_size=4096, max_stanza_size_before_auth=1024)
JUNK = st.sampled_from(
    [b"<", b">", b"'", b"&", b"]]>", b"<!--", b"<?x?>", b"\x00", b"\xff", b"\xc3", b"}",
     b"xmlns:p='urn:a}b'", b"<x xmlns='urn:a}b'/>", b"</x>", b"A" * 3000, b" " * 100]
)


@st.composite
def traffic(draw: st.DrawFn) -> list[bytes]:
    """The legal session, mutated, then cut into chunks."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(range(len(SESSION))), max_size=3)
                                 .map(lambda extra: SESSION + [SESSION[i] for i in extra])
                                 if draw(st.booleans()) else st.just(SESSION))))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[pos:pos] = draw(st.one_of(JUNK, st.binary(max_size=20)))
        else:
            end = draw(st.integers(pos, len(data)))
            data[draw(st.integers(0, len(data))) : 0] = data[pos:end]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [bytes(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def answer(stream: st_.Stream, events: list[st_.StreamEvent]) -> None:
    """Play the shell: answer what the stream asks for, as Connection would."""
    pending = list(events)
    while pending:
        event = pending.pop(0)
        if isinstance(event, st_.CredentialsNeeded):
            pending += stream.provide_credentials(CREDS.get(event.mechanism))
        elif isinstance(event, st_.BindRequested):
            assert stream.jid is not None
            pending += stream.bind_done(event.iq, JID.make(stream.jid.local, "example.org", "r"))
        elif isinstance(event, st_.SmEnableRequested):
            pending += stream.sm_enabled("sm1", event.resume, 60)
        elif isinstance(event, st_.ResumeRequested):
            pending += stream.resume_failed()
        elif isinstance(event, st_.AckRequested):
            stream.send_ack(0)
        elif isinstance(event, st_.StanzaReceived):
            stream.send(event.stanza)  # echoed back: the serializer must write it well-formed
        elif isinstance(event, st_.TlsRequested):
            stream.tls_started(ChannelBindings({}))


def assert_well_formed(output: bytes) -> None:
    """Each restarted stream is its own document: all of it must parse."""
    for document in output.split(b"<?xml version='1.0'?>"):
        if document:
            parser = ET.XMLPullParser()
            parser.feed(document)  # raises ET.ParseError on anything ill-formed
            list(parser.read_events())


def run(chunks: list[bytes]) -> None:
    stream = st_.Stream(
        st_.StreamSettings(domain="example.org", limits=LIMITS),
        tls=True,
        bindings=ChannelBindings({}),
    )
    output = b""
    for chunk in chunks:
        answer(stream, stream.receive_data(chunk))
        if not stream.closed:
            budget = 1024 if stream.phase is st_.Phase.CONNECTED else 4096
            assert stream.held <= budget
        output += stream.data_to_send()
    stream.no_more_input()  # never raises either
    assert_well_formed(output)


@given(traffic())
def test_mutated_sessions(chunks: list[bytes]) -> None:
    run(chunks)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_after_a_header(chunks: list[bytes]) -> None:
    run([HEADER, *chunks])
