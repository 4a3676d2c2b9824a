"""The sans-IO stream: negotiation (RFC 6120 §5-7) driven with bytes, no sockets."""

from __future__ import annotations

import base64

import pytest

from tests.helpers import feed_bytewise
from xmpp_server import stream as st
from xmpp_server.errors import Conflict
from xmpp_server.jid import JID
from xmpp_server.sasl import ChannelBindings, make_credentials

HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    b"to='example.org' version='1.0'>"
)
CREDS = {c.mechanism: c for c in make_credentials("secret", 4096)}
PLAIN = base64.b64encode(b"\0juliet\0secret")


def new_stream(**kwargs: object) -> st.Stream:
    settings = st.StreamSettings(domain="example.org", **kwargs)  # type: ignore[arg-type]
    return st.Stream(settings, tls=True, bindings=ChannelBindings({"tls-server-end-point": b"h"}))


def authenticate(stream: st.Stream) -> None:
    stream.receive_data(HEADER)
    events = stream.receive_data(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + PLAIN + b"</auth>"
    )
    assert events == [st.CredentialsNeeded("juliet", "SCRAM-SHA-256")]
    events = stream.provide_credentials(CREDS["SCRAM-SHA-256"])
    assert events == [st.Authenticated(JID.parse("juliet@example.org"), "PLAIN")]
    stream.data_to_send()


def test_features_after_tls_offer_sasl_and_channel_binding() -> None:
    stream = new_stream()
    assert stream.receive_data(HEADER) == []
    out = stream.data_to_send()
    assert out.startswith(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' ")
    assert b"<mechanism>SCRAM-SHA-256-PLUS</mechanism>" in out
    assert b"<mechanism>PLAIN</mechanism>" in out
    assert b'<channel-binding type="tls-server-end-point"/>' in out
    assert b"iq-register" not in out


def test_without_tls_only_starttls_is_offered() -> None:
    stream = st.Stream(st.StreamSettings(domain="example.org"))
    stream.receive_data(HEADER)
    out = stream.data_to_send()
    assert b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"><required/></starttls>' in out
    assert b"mechanism" not in out
    assert stream.receive_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>") == [
        st.TlsRequested()
    ]
    assert stream.data_to_send() == b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    stream.tls_started(ChannelBindings({}))
    stream.receive_data(HEADER)
    out = stream.data_to_send()
    assert b"<mechanism>PLAIN</mechanism>" in out and b"PLUS" not in out


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_full_login_to_bound_session(bytewise: bool) -> None:
    stream = new_stream()
    authenticate(stream)
    bind = (
        b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        b"<resource>balcony</resource></bind></iq>"
    )
    feed = stream.receive_data
    events = feed_bytewise(feed, HEADER + bind) if bytewise else feed(HEADER + bind)
    assert len(events) == 1 and isinstance(events[0], st.BindRequested)
    assert events[0].resource == "balcony"
    assert b'<bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"/>' in stream.data_to_send()
    stream.bind_done(events[0].iq, JID.parse("juliet@example.org/balcony"))
    assert stream.data_to_send() == (
        b'<iq type="result" id="b1"><bind xmlns="urn:ietf:params:xml:ns:xmpp-bind">'
        b"<jid>juliet@example.org/balcony</jid></bind></iq>"
    )
    events = stream.receive_data(b"<message to='romeo@example.org'><body>hi</body></message>")
    assert len(events) == 1 and isinstance(events[0], st.StanzaReceived)


def test_ack_request_pipelined_after_enable_waits_for_enabled() -> None:
    """slixmpp sends <enable/><r/> in one packet; the <r/> is answered after <enabled/>,
    not refused as 'stream management is not enabled' (seen as a flaky CI login)."""
    stream = new_stream()
    authenticate(stream)
    events = stream.receive_data(
        HEADER + b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    stream.bind_done(events[0].iq, JID.parse("juliet@example.org/balcony"))
    stream.data_to_send()
    events = stream.receive_data(
        b"<enable xmlns='urn:xmpp:sm:3' resume='true'/><r xmlns='urn:xmpp:sm:3'/>"
    )
    assert events == [st.SmEnableRequested(True)]
    assert stream.sm_enabled("s1", True, 300) == [st.AckRequested()]
    assert not stream.closed
    assert stream.data_to_send().startswith(b"<enabled xmlns='urn:xmpp:sm:3' id='s1'")


def test_input_is_held_while_credentials_load() -> None:
    stream = new_stream()
    stream.receive_data(HEADER)
    events = stream.receive_data(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + PLAIN + b"</auth>"
        b"<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    )
    assert events == [st.CredentialsNeeded("juliet", "SCRAM-SHA-256")]
    # The abort is processed only after the answer, in order.
    events = stream.provide_credentials(None)
    assert events == [st.AuthFailed("juliet", "not-authorized")]
    out = stream.data_to_send()
    assert out.index(b"<not-authorized/>") < out.index(b"<aborted/>")


def test_wrong_password_then_too_many_attempts() -> None:
    stream = new_stream()
    stream.receive_data(HEADER)
    wrong = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>%s</auth>" % (
        base64.b64encode(b"\0juliet\0nope")
    )
    for _ in range(st.MAX_SASL_ATTEMPTS):
        stream.receive_data(wrong)
        events = stream.provide_credentials(CREDS["SCRAM-SHA-256"])
        assert events[0] == st.AuthFailed("juliet", "not-authorized")
    assert isinstance(events[-1], st.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "policy-violation"
    assert stream.closed


def test_stanza_before_bind_is_not_authorized() -> None:
    stream = new_stream()
    authenticate(stream)
    stream.receive_data(HEADER)
    events = stream.receive_data(b"<message to='romeo@example.org'/>")
    assert isinstance(events[-1], st.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "not-authorized"


def test_bind_failure_keeps_stream_open() -> None:
    stream = new_stream()
    authenticate(stream)
    events = stream.receive_data(
        HEADER + b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    assert isinstance(events[0], st.BindRequested) and events[0].resource is None
    stream.data_to_send()
    stream.bind_failed(events[0].iq, Conflict())
    assert b'<conflict xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/>' in stream.data_to_send()
    assert not stream.closed


def test_error_before_header_sends_our_header_first() -> None:
    stream = new_stream()
    events = stream.receive_data(b"<not-a-stream/>")
    assert isinstance(events[0], st.StreamEnded)
    out = stream.data_to_send()
    assert out.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert out.endswith(
        b'<stream:error><not-well-formed xmlns="urn:ietf:params:xml:ns:xmpp-streams"/>'
        b'<text xmlns="urn:ietf:params:xml:ns:xmpp-streams" xml:lang="en">'
        b"expected &lt;stream:stream&gt;</text></stream:error></stream:stream>"
    )


def test_peer_close_is_answered_with_close() -> None:
    stream = new_stream()
    stream.receive_data(HEADER)
    stream.data_to_send()
    assert stream.receive_data(b"</stream:stream>") == [st.StreamEnded(None)]
    assert stream.data_to_send() == b"</stream:stream>"


def test_registration_offered_only_when_enabled_and_passes_credentials() -> None:
    stream = new_stream(registration=True)
    stream.receive_data(HEADER)
    assert b'<register xmlns="http://jabber.org/features/iq-register"/>' in stream.data_to_send()
    events = stream.receive_data(
        b"<iq type='set' id='r1'><query xmlns='jabber:iq:register'>"
        b"<username>bill</username><password>Calliope</password></query></iq>"
    )
    assert len(events) == 1 and isinstance(events[0], st.RegistrationRequested)
    assert (events[0].username, events[0].password) == ("bill", "Calliope")
    stream.registration_failed(events[0].iq, Conflict())
    out = stream.data_to_send()
    assert b"<conflict" in out and b"Calliope" not in out


def test_nonzas_of_a_registered_namespace_become_events_after_bind() -> None:
    """XEP-0352 <inactive/>: offered as a session feature, handed to the shell as a nonza."""
    csi = "urn:xmpp:csi:0"
    stream = new_stream(session_features=(f"{{{csi}}}csi",), nonza_namespaces=(csi,))
    authenticate(stream)
    events = stream.receive_data(
        HEADER + b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    assert b'<csi xmlns="urn:xmpp:csi:0"/>' in stream.data_to_send()
    stream.bind_done(events[0].iq, JID.parse("juliet@example.org/balcony"))
    events = stream.receive_data(b"<inactive xmlns='urn:xmpp:csi:0'/>")
    assert len(events) == 1 and isinstance(events[0], st.NonzaReceived)
    assert events[0].element.tag == "{urn:xmpp:csi:0}inactive"
    events = stream.receive_data(b"<inactive xmlns='urn:xmpp:other'/>")
    assert stream.closed and isinstance(events[-1], st.StreamEnded)
