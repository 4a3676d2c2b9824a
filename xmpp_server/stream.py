"""The sans-IO state of one client stream (RFC 6120 §4-§7).

Bytes go in through :meth:`Stream.receive_data`; bytes to write come out of
:meth:`Stream.data_to_send`; what the shell must act on comes back as events.

Rule 1: the stream never waits. When negotiation needs something only the shell
can do (start TLS, load credentials, bind a resource against the session table),
it emits an event and holds further input until the shell answers through
:meth:`tls_started`, :meth:`provide_credentials` / :meth:`reject_auth`, or
:meth:`bind_done` / :meth:`bind_failed`.

Rule 2: ``StreamError`` is caught here and nowhere else. It becomes
``<stream:error>`` plus ``</stream:stream>`` (after our own header if we had not
sent it yet, RFC 6120 §4.9.1.1) and the stream is closed for good.

Rule 3: nothing but negotiation passes before resource binding; a stanza sent
early is a ``not-authorized`` stream error.
"""

from __future__ import annotations

import base64
import binascii
import os
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from xmpp_server import sasl
from xmpp_server.credentials import ScramCredentials
from xmpp_server.errors import (
    NS_STREAM_ERRORS,
    NS_STREAMS,
    BadRequest,
    StanzaError,
    StreamError,
)
from xmpp_server.jid import JID
from xmpp_server.sm import NS_SM, parse_h
from xmpp_server.stanza import IQ, STANZA_TAGS, error_reply, iq_result, qn
from xmpp_server.xml import (
    NS_CLIENT,
    XML_LANG,
    Element,
    ElementReceived,
    StreamClosed,
    StreamOpened,
    XmlLimits,
    XmlStreamParser,
    escape_attr,
    tobytes,
)

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_SASL_CB = "urn:xmpp:sasl-cb:0"
NS_ROSTERVER = "urn:xmpp:features:rosterver"
NS_PREAPPROVAL = "urn:xmpp:features:pre-approval"
NS_REGISTER = "jabber:iq:register"
NS_REGISTER_FEATURE = "http://jabber.org/features/iq-register"
REGISTER_QUERY = qn(NS_REGISTER, "query")

MAX_SASL_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class StreamSettings:
    domain: str
    require_tls: bool = True
    mechanisms: Sequence[str] = (
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-1",
        "PLAIN",
    )
    limits: XmlLimits = field(default_factory=XmlLimits)
    tls_available: bool = True
    # Extra <stream:features> children offered after binding (e.g. stream management).
    session_features: tuple[str, ...] = ()
    # Unknown users get made-up SCRAM salts derived from this, identical across restarts,
    # with the iteration count real accounts get: no user enumeration through SASL.
    fake_secret: bytes = b""
    scram_iterations: int = 4096
    # XEP-0077: accounts may be created on the stream before authentication (after TLS).
    registration: bool = False
    # XEP-0198: offer stream management (acks and resumption).
    stream_management: bool = True
    # Namespaces of top-level elements (nonzas) a module handles once bound, e.g. XEP-0352
    # <active/>/<inactive/>: they come out as ``NonzaReceived`` instead of a stream error.
    nonza_namespaces: tuple[str, ...] = ()


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsRequested:
    """Write out pending data, then upgrade the socket and call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class CredentialsNeeded:
    username: str
    mechanism: str  # which SCRAM family to load


@dataclass(frozen=True, slots=True)
class Authenticated:
    jid: JID
    mechanism: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    username: str | None
    condition: str


@dataclass(frozen=True, slots=True)
class BindRequested:
    resource: str | None
    iq: Element


@dataclass(frozen=True, slots=True)
class RegistrationRequested:
    """XEP-0077 §3.1: create an account, then call ``registration_done``/``_failed``."""

    username: str
    password: str
    iq: Element


@dataclass(frozen=True, slots=True)
class SmEnableRequested:
    """XEP-0198 §3: answer with ``sm_enabled``; later input is held until then."""

    resume: bool


@dataclass(frozen=True, slots=True)
class ResumeRequested:
    """XEP-0198 §5: answer with ``resumed`` or ``resume_failed``."""

    previd: str
    h: int


@dataclass(frozen=True, slots=True)
class AckRequested:
    """``<r/>``: answer with ``send_ack`` once every stanza before it was handled."""


@dataclass(frozen=True, slots=True)
class AckReceived:
    h: int


@dataclass(frozen=True, slots=True)
class StanzaReceived:
    stanza: Element


@dataclass(frozen=True, slots=True)
class NonzaReceived:
    """A top-level non-stanza element in one of ``StreamSettings.nonza_namespaces``."""

    element: Element


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The stream is over; close the socket once pending data is written."""

    error: StreamError | None


StreamEvent = (
    TlsRequested
    | CredentialsNeeded
    | Authenticated
    | AuthFailed
    | BindRequested
    | RegistrationRequested
    | SmEnableRequested
    | ResumeRequested
    | AckRequested
    | AckReceived
    | StanzaReceived
    | NonzaReceived
    | StreamEnded
)


class Phase(Enum):
    CONNECTED = auto()  # before TLS (or on direct TLS) and before authentication
    AUTHENTICATED = auto()
    BOUND = auto()
    CLOSED = auto()


class Wait(Enum):
    NONE = auto()
    TLS = auto()
    CREDENTIALS = auto()
    BIND = auto()
    REGISTRATION = auto()
    RESUME = auto()
    SM_ENABLE = auto()


class Stream:
    """One client-to-server stream from the server's side."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        tls: bool = False,
        bindings: sasl.ChannelBindings | None = None,
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.bindings = bindings or sasl.ChannelBindings({})
        self.phase = Phase.CONNECTED
        self.jid: JID | None = None  # bare after auth, full after bind
        self.stream_id = ""
        self.lang = "en"
        self._parser = self._new_parser()
        self._out: list[bytes] = []
        self._header_sent = False
        self._wait = Wait.NONE
        self._held: deque[Element] = deque()
        self._mechanism: sasl.Mechanism | None = None
        self._offered: list[str] = []
        self._sasl_failures = 0
        self.sm_active = False

    # -- public API -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self.phase is Phase.CLOSED:
            return events
        # A restart requested earlier (SASL success while the shell loaded credentials) has
        # already replaced the parser; only one requested during this feed stops it.
        self._restarting = False
        try:
            for xml_event in self._parser.feed(data):
                if isinstance(xml_event, ElementReceived):
                    if self._wait is not Wait.NONE or self._held:
                        self._held.append(xml_event.element)
                    else:
                        self._element(xml_event.element, events)
                elif isinstance(xml_event, StreamOpened):
                    self._opened(xml_event, events)
                elif isinstance(xml_event, StreamClosed):
                    self._closed_by_peer(events)
                if self.closed or self._restarting:
                    break
        except StreamError as exc:
            self._fail(exc, events)
        self._restarting = False
        return events

    _restarting = False

    def send(self, stanza: Element) -> None:
        """Queue an outbound stanza (the shell calls this for routed stanzas)."""
        if self.phase is not Phase.CLOSED:
            self._out.append(tobytes(stanza))

    def send_serialized(self, data: bytes) -> None:
        """Queue a stanza the shell serialized itself (once for many recipients)."""
        if self.phase is not Phase.CLOSED:
            self._out.append(data)

    def close(self, error: StreamError | None = None) -> list[StreamEvent]:
        """Close from our side, e.g. for ``conflict``, ``connection-timeout`` or shutdown."""
        events: list[StreamEvent] = []
        if self.phase is not Phase.CLOSED:
            if error is not None:
                self._fail(error, events)
            else:
                self._out.append(b"</stream:stream>")
                self.phase = Phase.CLOSED
                events.append(StreamEnded(None))
        return events

    def tls_started(self, bindings: sasl.ChannelBindings) -> None:
        self.tls = True
        self.bindings = bindings
        self._restart()
        self._wait = Wait.NONE

    def provide_credentials(self, creds: ScramCredentials | None) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._wait is not Wait.CREDENTIALS or self._mechanism is None:
            return events
        self._wait = Wait.NONE
        try:
            self._sasl_result(self._mechanism.provide_credentials(creds), events)
        except sasl.SaslFailure as exc:
            self._sasl_failure(exc, events)
        return self._drain_held(events)

    def reject_auth(self, condition: str, text: str | None = None) -> list[StreamEvent]:
        """Fail the running exchange without checking (login throttled)."""
        events: list[StreamEvent] = []
        if self._wait is Wait.CREDENTIALS:
            self._wait = Wait.NONE
            self._sasl_failure(sasl.SaslFailure(condition, text), events)
        return self._drain_held(events)

    def bind_done(self, iq: Element, full_jid: JID) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self.jid = full_jid
        self.phase = Phase.BOUND
        bind = Element(qn(NS_BIND, "bind"))
        ET.SubElement(bind, qn(NS_BIND, "jid")).text = str(full_jid)
        self._out.append(tobytes(iq_result(iq, bind)))
        return self._drain_held([])

    def sm_enabled(self, sm_id: str, resume: bool, max_seconds: int) -> list[StreamEvent]:
        """Answer ``SmEnableRequested``; what the client pipelined after ``<enable/>`` (an
        ``<r/>`` in the same packet is common) is only handled now that SM is on."""
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self.sm_active = True
        attrs = f" id='{escape_attr(sm_id)}' resume='true' max='{max_seconds}'" if resume else ""
        self._out.append(f"<enabled xmlns='{NS_SM}'{attrs}/>".encode())
        return self._drain_held([])

    def sm_failed(self, condition: str = "unexpected-request") -> None:
        if self.phase is Phase.CLOSED:
            return
        self._out.append(_sm_failed(condition))

    def send_ack(self, h: int) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._out.append(f"<a xmlns='{NS_SM}' h='{h}'/>".encode())

    def request_ack(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._out.append(f"<r xmlns='{NS_SM}'/>".encode())

    def resumed(self, full_jid: JID, previd: str, h: int) -> list[StreamEvent]:
        """The session ``previd`` continues on this stream; the shell then resends what the
        client has not acknowledged."""
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self.jid = full_jid
        self.phase = Phase.BOUND
        self.sm_active = True
        self._out.append(
            f"<resumed xmlns='{NS_SM}' previd='{escape_attr(previd)}' h='{h}'/>".encode()
        )
        return self._drain_held([])

    def resume_failed(self, h: int | None = None) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self._out.append(_sm_failed("item-not-found", h))
        return self._drain_held([])

    def registration_done(self, iq: Element) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self._out.append(tobytes(iq_result(iq)))
        return self._drain_held([])

    def registration_failed(self, iq: Element, error: StanzaError) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        # Never echo the request back: it holds the password (XEP-0077 §3.3).
        reply = error_reply(Element(iq.tag, dict(iq.attrib)), error)
        self._out.append(tobytes(reply))
        return self._drain_held([])

    def bind_failed(self, iq: Element, error: StanzaError) -> list[StreamEvent]:
        if self.phase is Phase.CLOSED:
            return []  # closed while the shell worked: nothing may follow the close
        self._wait = Wait.NONE
        self._out.append(tobytes(error_reply(iq, error)))
        return self._drain_held([])

    # -- negotiation ------------------------------------------------------------------

    def _drain_held(self, events: list[StreamEvent]) -> list[StreamEvent]:
        try:
            while self._held and self._wait is Wait.NONE and self.phase is not Phase.CLOSED:
                self._element(self._held.popleft(), events)
        except StreamError as exc:
            self._fail(exc, events)
        return events

    def no_more_input(self) -> None:
        """The transport is gone: free the XML parser now rather than at the next full
        garbage collection (its handlers hold it in a cycle)."""
        self._parser.release()

    def _restart(self) -> None:
        """Start a new stream on the same connection (after TLS or SASL)."""
        self._parser.release()
        self._parser = self._new_parser()
        self._header_sent = False
        self._held.clear()
        self._restarting = True

    def _new_parser(self) -> XmlStreamParser:
        """Until SASL succeeds the parser may hold only ``max_stanza_size_before_auth``
        bytes: an anonymous peer gets a small budget (the header and negotiation elements
        fit in it easily), an authenticated user the full stanza size."""
        limits = self.settings.limits
        if self.phase is Phase.CONNECTED:
            return XmlStreamParser(limits, budget=limits.max_stanza_size_before_auth)
        return XmlStreamParser(limits)

    @property
    def held(self) -> int:
        """Bytes of input the stream holds now (its parser's)."""
        return self._parser.held

    def _header(self, lang: str | None = None) -> bytes:
        self.stream_id = base64.b32encode(os.urandom(10)).decode().lower()
        return (
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            f"xmlns:stream='{NS_STREAMS}' id='{self.stream_id}' "
            f"from='{escape_attr(self.settings.domain)}' version='1.0' "
            f"xml:lang='{escape_attr(lang or self.lang)}'>"
        ).encode()

    def _opened(self, ev: StreamOpened, events: list[StreamEvent]) -> None:
        lang = ev.attrs.get(XML_LANG)
        if lang and len(lang) < 36 and lang.replace("-", "").isalnum():
            self.lang = lang
        self._out.append(self._header())
        self._header_sent = True
        if ev.default_ns != NS_CLIENT:
            raise StreamError("invalid-namespace", "the default namespace must be jabber:client")
        to = ev.attrs.get("to", "")
        try:
            host = JID.parse(to).domain if to else ""
        except ValueError:
            host = ""
        if host != self.settings.domain:
            raise StreamError("host-unknown", f"this server does not serve {to!r}")
        version = ev.attrs.get("version", "0.9")
        if not version.startswith("1."):
            raise StreamError("unsupported-version", "only XMPP 1.0 streams are supported")
        self._out.append(tobytes(self._features()))

    def _features(self) -> Element:
        features = Element(qn(NS_STREAMS, "features"))
        if self.phase is Phase.CONNECTED:
            if not self.tls and self.settings.tls_available:
                starttls = ET.SubElement(features, qn(NS_TLS, "starttls"))
                if self.settings.require_tls:
                    ET.SubElement(starttls, qn(NS_TLS, "required"))
                    return features
            self._offered = sasl.available_mechanisms(
                tls=self.tls, bindings=self.bindings, enabled=self.settings.mechanisms
            )
            mechs = ET.SubElement(features, qn(NS_SASL, "mechanisms"))
            for name in self._offered:
                ET.SubElement(mechs, qn(NS_SASL, "mechanism")).text = name
            if self._may_register():
                ET.SubElement(features, qn(NS_REGISTER_FEATURE, "register"))
            if any(name.endswith("-PLUS") for name in self._offered):
                cb = ET.SubElement(features, qn(NS_SASL_CB, "sasl-channel-binding"))
                for cb_type in self.bindings.data:
                    ET.SubElement(cb, qn(NS_SASL_CB, "channel-binding"), {"type": cb_type})
        elif self.phase is Phase.AUTHENTICATED:
            ET.SubElement(features, qn(NS_BIND, "bind"))
            session = ET.SubElement(features, qn(NS_SESSION, "session"))
            ET.SubElement(session, qn(NS_SESSION, "optional"))
            ET.SubElement(features, qn(NS_ROSTERVER, "ver"))
            ET.SubElement(features, qn(NS_PREAPPROVAL, "sub"))
            if self.settings.stream_management:
                ET.SubElement(features, qn(NS_SM, "sm"))
            for tag in self.settings.session_features:
                ET.SubElement(features, tag)
        return features

    def _element(self, el: Element, events: list[StreamEvent]) -> None:
        tag = el.tag
        if self.phase is Phase.BOUND:
            if tag in STANZA_TAGS:
                events.append(StanzaReceived(el))
                return
            if tag.startswith(_SM_PREFIX) and self.settings.stream_management:
                self._sm_element(el, events)
                return
            if tag[:1] == "{" and tag[1:].partition("}")[0] in self.settings.nonza_namespaces:
                events.append(NonzaReceived(el))
                return
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")
        if self.phase is Phase.CONNECTED:
            ns = tag[1:].partition("}")[0] if tag[:1] == "{" else ""
            if ns == NS_TLS and tag == qn(NS_TLS, "starttls"):
                self._starttls(events)
            elif ns == NS_SASL:
                self._sasl(el, events)
            elif tag == IQ and self._may_register() and el.find(REGISTER_QUERY) is not None:
                self._register(el, events)
            elif tag in STANZA_TAGS:
                raise StreamError("not-authorized", "authenticate first")
            else:
                raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")
            return
        # AUTHENTICATED: only resource binding or stream resumption may pass.
        if tag == qn(NS_SM, "resume") and self.settings.stream_management:
            self._wait = Wait.RESUME
            events.append(ResumeRequested(el.get("previd", ""), parse_h(el)))
            return
        if tag == qn(NS_SM, "enable"):
            self.sm_failed("unexpected-request")  # XEP-0198 §3: only after binding
            return
        if tag == IQ and el.get("type") == "set":
            bind = el.find(qn(NS_BIND, "bind"))
            if bind is not None:
                res = bind.findtext(qn(NS_BIND, "resource"))
                self._wait = Wait.BIND
                events.append(BindRequested(res.strip() if res and res.strip() else None, el))
                return
        if tag in STANZA_TAGS:
            raise StreamError("not-authorized", "bind a resource first")
        raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    def _sm_element(self, el: Element, events: list[StreamEvent]) -> None:
        local = el.tag.rpartition("}")[2]
        if local == "enable":
            if self.sm_active:
                self.sm_failed("unexpected-request")
            else:
                self._wait = Wait.SM_ENABLE
                events.append(SmEnableRequested(el.get("resume") in ("true", "1")))
        elif not self.sm_active:
            raise StreamError("unsupported-stanza-type", "stream management is not enabled")
        elif local == "r":
            events.append(AckRequested())
        elif local == "a":
            events.append(AckReceived(parse_h(el)))
        elif local == "resume":
            self.sm_failed("unexpected-request")
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")

    def _may_register(self) -> bool:
        return self.settings.registration and (self.tls or not self.settings.require_tls)

    def _register(self, iq: Element, events: list[StreamEvent]) -> None:
        query = iq.find(qn(NS_REGISTER, "query"))
        assert query is not None
        if iq.get("type") == "get":
            form = Element(qn(NS_REGISTER, "query"))
            ET.SubElement(
                form, qn(NS_REGISTER, "instructions")
            ).text = "Choose a username and password for use with this service."
            ET.SubElement(form, qn(NS_REGISTER, "username"))
            ET.SubElement(form, qn(NS_REGISTER, "password"))
            self._out.append(tobytes(iq_result(iq, form)))
        elif iq.get("type") == "set":
            username = (query.findtext(qn(NS_REGISTER, "username")) or "").strip()
            password = query.findtext(qn(NS_REGISTER, "password")) or ""
            if not username or not password:
                self.registration_failed(iq, BadRequest("username and password are required"))
                return
            self._wait = Wait.REGISTRATION
            events.append(RegistrationRequested(username, password, iq))
        else:
            raise StreamError("not-authorized", "authenticate first")

    def _starttls(self, events: list[StreamEvent]) -> None:
        if self.tls or not self.settings.tls_available:
            self._out.append(tobytes(Element(qn(NS_TLS, "failure")), NS_CLIENT))
            self._out.append(b"</stream:stream>")
            self.phase = Phase.CLOSED
            events.append(StreamEnded(None))
            return
        self._out.append(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self._wait = Wait.TLS
        self._restarting = True
        events.append(TlsRequested())

    def _sasl(self, el: Element, events: list[StreamEvent]) -> None:
        local = el.tag.rpartition("}")[2]
        try:
            if not self.tls and self.settings.require_tls and self.settings.tls_available:
                raise sasl.SaslFailure("encryption-required", "start TLS first")
            if local == "auth":
                name = el.get("mechanism", "")
                self._mechanism = sasl.create_mechanism(
                    name,
                    tls=self.tls,
                    bindings=self.bindings,
                    offered=self._offered,
                    fake_secret=self.settings.fake_secret or sasl.PROCESS_FAKE_SECRET,
                    fake_iterations=self.settings.scram_iterations,
                )
                self._sasl_result(self._mechanism.start(_b64(el.text)), events)
            elif local == "response":
                if self._mechanism is None:
                    raise sasl.SaslFailure("malformed-request", "no authentication in progress")
                self._sasl_result(self._mechanism.respond(_b64(el.text) or b""), events)
            elif local == "abort":
                self._mechanism = None
                raise sasl.SaslFailure("aborted")
            else:
                raise StreamError("unsupported-stanza-type", f"unexpected SASL element {local}")
        except sasl.SaslFailure as exc:
            self._sasl_failure(exc, events)

    def _sasl_result(
        self,
        result: sasl.Challenge | sasl.Success | sasl.NeedCredentials,
        events: list[StreamEvent],
    ) -> None:
        mech = self._mechanism
        assert mech is not None
        if isinstance(result, sasl.NeedCredentials):
            self._wait = Wait.CREDENTIALS
            events.append(CredentialsNeeded(result.username, mech.credentials_mechanism))
        elif isinstance(result, sasl.Challenge):
            self._out.append(_sasl_element("challenge", result.data))
        else:
            username = mech.authcid or ""
            try:
                jid = JID.make(username, self.settings.domain)
            except ValueError:
                raise sasl.SaslFailure("not-authorized") from None
            if mech.authzid and mech.authzid not in (str(jid), username):
                raise sasl.SaslFailure("invalid-authzid")
            self._out.append(_sasl_element("success", result.data))
            self.jid = jid
            self.phase = Phase.AUTHENTICATED
            self._mechanism = None
            self._restart()
            events.append(Authenticated(jid, mech.name))

    def _sasl_failure(self, exc: sasl.SaslFailure, events: list[StreamEvent]) -> None:
        username = self._mechanism.authcid if self._mechanism else None
        self._mechanism = None
        failure = Element(qn(NS_SASL, "failure"))
        ET.SubElement(failure, qn(NS_SASL, exc.condition))
        if exc.text:
            ET.SubElement(failure, qn(NS_SASL, "text")).text = exc.text
        self._out.append(tobytes(failure))
        if exc.condition != "aborted":
            events.append(AuthFailed(username, exc.condition))
            self._sasl_failures += 1
            if self._sasl_failures >= MAX_SASL_ATTEMPTS:
                self._fail(
                    StreamError("policy-violation", "too many failed authentication attempts"),
                    events,
                )

    def _closed_by_peer(self, events: list[StreamEvent]) -> None:
        self._out.append(b"</stream:stream>")
        self.phase = Phase.CLOSED
        events.append(StreamEnded(None))

    def _fail(self, exc: StreamError, events: list[StreamEvent]) -> None:
        if self.phase is Phase.CLOSED:
            return
        if not self._header_sent:
            self._out.append(self._header())
            self._header_sent = True
        err = Element(qn(NS_STREAMS, "error"))
        ET.SubElement(err, qn(NS_STREAM_ERRORS, exc.condition))
        if exc.text:
            text = ET.SubElement(err, qn(NS_STREAM_ERRORS, "text"))
            text.set(XML_LANG, "en")
            text.text = exc.text
        err.extend(exc.extra)
        self._out.append(tobytes(err))
        self._out.append(b"</stream:stream>")
        self.phase = Phase.CLOSED
        events.append(StreamEnded(exc))


_SM_PREFIX = f"{{{NS_SM}}}"


def _sm_failed(condition: str, h: int | None = None) -> bytes:
    h_attr = f" h='{h}'" if h is not None else ""
    return (
        f"<failed xmlns='{NS_SM}'{h_attr}><{condition} "
        "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    ).encode()


def _b64(text: str | None) -> bytes | None:
    """Decode SASL payload text: absent = no data, ``=`` = empty (RFC 6120 §6.4.2)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise sasl.SaslFailure("incorrect-encoding", "invalid base64") from None


def _sasl_element(name: str, data: bytes | None) -> bytes:
    payload = "=" if data == b"" else (base64.b64encode(data).decode() if data else "")
    return f"<{name} xmlns='{NS_SASL}'>{payload}</{name}>".encode()
