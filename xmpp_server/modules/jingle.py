"""Call signalling: XEP-0353 Jingle Message Initiation (``urn:xmpp:jingle-message:0``) and the
XEP-0166 Jingle iqs it leads to.

What the server does with the JMI messages (``<propose/>``, ``<ringing/>``, ``<proceed/>``,
``<accept/>``, ``<reject/>``, ``<retract/>``, ``<finish/>``):

* **A call rings everywhere.** A JMI message of type chat or normal to a bare JID goes to
  *every* available resource of the account with a non-negative priority, not only to the
  highest-priority ones as RFC 6121 §8.5.2 would have it. Resources with a negative priority
  asked not to get messages sent to the bare JID, and still do not. With no such resource the
  message takes the ordinary road: the offline queue (and :meth:`Jingle.on_call_for_offline`
  for a propose, the hook point for push notifications).
* **Carbons and the archive** need nothing here: the messages are type chat, so the carbons
  module copies them (the caller's other devices see the propose, the callee's other devices
  see its ``<proceed/>`` and stop ringing), and MAM archives them (their tags are in its set of
  content payloads).
* **A propose still ringing reaches resources that come online later.** Proposes sent to a
  bare JID are kept in memory, per callee and session id, until the call is answered
  (``proceed``/``accept``), declined (``reject``), withdrawn (``retract``), ended
  (``finish``) or ``ring_timeout`` passes. A resource that becomes available meanwhile gets the
  propose, with a XEP-0203 ``<delay/>`` of when it was sent, unless the offline queue is
  about to give it to that resource anyway (this module is set up before the offline module
  so that its ``on_available`` hook runs before the flush).
* **Missed calls are recorded.** A propose withdrawn by its caller or unanswered within
  ``ring_timeout`` leaves the callee a message from the server's domain, type chat, with a
  ``<body>`` "Missed call from <caller> at <time> UTC" and
  ``<x xmlns='urn:natter:missed-call' from='<caller bare JID>' sid='<session id>'
  stamp='<XEP-0082 time of the propose>' reason='retract|timeout'/>``; it is delivered, queued
  offline and archived like any chat message, so every device learns about the call.
* **Calls are rate-limited per caller**: after ``max_calls_per_minute`` proposes within a
  minute, further proposes bounce with ``<resource-constraint/>`` (type ``wait``) for a minute.
* **Voicemail** (``voicemail = true``; needs the upload module and ``[http]``): a propose to
  a bare JID still ringing after ``voicemail_after`` seconds, or reaching an account with no
  available resource, is answered by the server as ``<account>/voicemail``, the way one of
  the callee's devices would: ``<accept/>`` to the callee's account (its ringing devices stop;
  an offline one finds it after the propose), a ``<proceed/>`` to the caller (carbon-copied to
  the callee's devices). The caller's session with that JID is answered and recorded by
  :class:`voip.voicemail.Voicemail` (Ogg/Opus, at most ``voicemail_max_seconds``), stored as
  an upload of the callee (quota, expiry, purge and GET URL as for files) and announced in
  the call's one record: the missed-call message with ``reason='voicemail'``, a body "Voicemail
  from <caller>, <n> s", XEP-0066 ``<x xmlns='jabber:x:oob'>`` and a XEP-0385 (SIMS) file
  reference (media type, size, hash, ``<length/>`` in ms). From the domain, like every missed
  call: the server wrote it, not the caller. With nothing recorded (the caller gave up first,
  no Opus, over quota) it is a plain missed-call record with ``reason='voicemail'``. A declined
  call (``<reject/>``) does not go to voicemail.

Jingle iqs (``urn:xmpp:jingle:1``) need no handler: the router delivers an iq to a full JID to
that session untouched, and answers one to a resource that is not online with
``service-unavailable`` (RFC 6121 §8.5.3.2.1).

**Media anchoring** (``media = "relay"``): the server takes every caller's Jingle
session-initiate to a callee's full JID and anchors the call in its relay
(:class:`voip.relay.Anchor`: one aiortc leg per client, session-accept from the callee's JID,
a second session from the caller's JID to the callee), so each client only reaches the
server. A session whose DTLS fingerprint is OMEMO-encrypted stays direct, and the log says
why. ``direct`` (the default) leaves Jingle iqs to the router.

Pending proposes live in this process only: a restart forgets them (the offline queue and the
archive still hold the messages; clients judge their age by the ``<delay/>``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from xmpp_server.errors import ResourceConstraint, StreamError
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.carbons import Carbons, carbon
from xmpp_server.router import Session
from xmpp_server.stanza import clone, make, new_id, qn
from xmpp_server.storage.uploads import Completion
from xmpp_server.throttle import FailureThrottle
from xmpp_server.xml import NS_CLIENT, Element, fromstring

if TYPE_CHECKING:
    from voip.voicemail import Voicemail, VoicemailSession
    from xmpp_server.modules.upload import HttpUpload
    from xmpp_server.server import Host
    from xmpp_server.storage.uploads import Upload

log = logging.getLogger("natterd.jingle")

NS_JMI = "urn:xmpp:jingle-message:0"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_MISSED_CALL = "urn:natter:missed-call"
NS_DELAY = "urn:xmpp:delay"
NS_HINTS = "urn:xmpp:hints"
NS_OOB = "jabber:x:oob"
NS_REFERENCE = "urn:xmpp:reference:0"
NS_SIMS = "urn:xmpp:sims:1"
NS_FILE = "urn:xmpp:jingle:apps:file-transfer:5"
VOICEMAIL_RESOURCE = "voicemail"
"""The resource of the JID voicemail answers from (``bob@example.org/voicemail``)."""

JMI_TAGS = frozenset(
    qn(NS_JMI, tag)
    for tag in ("propose", "ringing", "proceed", "accept", "reject", "retract", "finish")
)
"""Every XEP-0353 message payload (MAM archives messages carrying one)."""
PROPOSE = qn(NS_JMI, "propose")
RETRACT = qn(NS_JMI, "retract")
FINISH = qn(NS_JMI, "finish")
RATE_WINDOW = 60.0  # seconds: max_calls_per_minute counts proposes in this window
MAX_PENDING_PER_USER = 32  # proposes ringing one account at once; the oldest is forgotten

OfflineCallHook = Callable[[JID, Element], Awaitable[None]]
"""(callee's bare JID, the propose) for a call to an account with no available resource."""


@dataclass(frozen=True)
class JingleOptions:
    ring_timeout: float = field(default=45.0, metadata={"gt": 0})
    """Seconds a proposed call rings (reaching resources that come online) before it counts
    as missed."""
    max_calls_per_minute: int = field(default=10, metadata={"min": 0})
    """Proposes one user may send per minute; more bounce with resource-constraint. 0: no
    limit."""
    media: Literal["direct", "relay"] = "direct"
    """``direct``: clients exchange media with each other (through our STUN/TURN);
    ``relay``: the server anchors every call's media in its aiortc relay."""
    relay_media_timeout: float = field(default=30.0, metadata={"gt": 0})
    """Relay mode: seconds without audio after which an anchored call is ended."""
    relay_forward: Literal["transcode", "passthrough"] = "transcode"
    """Relay mode: ``transcode`` decodes and re-encodes the audio (aiortc's public API);
    ``passthrough`` forwards the Opus packets untouched (about a quarter of the CPU)."""
    relay_port_range: str = ""
    """Relay mode: ``"min-max"``, the UDP ports the relay's legs bind ("": any port)."""
    relay_public_address: str = ""
    """Relay mode: the address the relay's candidates advertise, for a server behind 1:1 NAT
    ("": its own addresses)."""
    relay_shared_port: int = field(default=0, metadata={"min": 0, "max": 65535})
    """Relay mode: carry every anchored leg on this one UDP port (one firewall rule, as Jitsi
    Videobridge's port 10000), told apart by ICE ufrag and source address; 0 = a socket per
    leg (in ``relay_port_range`` if set)."""
    voicemail: bool = False
    """Answer calls nobody takes and leave the callee the recording (needs the upload module
    and ``[http]``; its legs bind like the relay's, ``relay_port_range`` and
    ``relay_public_address``). Off by default: the server then answers calls on its users'
    behalf and stores their callers' voices, which a deployment should choose to do."""
    voicemail_after: float = field(default=20.0, metadata={"gt": 0})
    """Seconds a call rings before voicemail takes it (``ring_timeout`` when that is shorter);
    an account with no available resource gets voicemail at once."""
    voicemail_max_seconds: float = field(default=60.0, metadata={"gt": 0, "max": 600})
    """Longest recording; the call is hung up when it is reached (a recording is held in
    memory until it ends, about 1 MB a minute)."""


def jmi_payload(message: Element) -> Element | None:
    """The XEP-0353 element of a message, if it is a JMI message."""
    for child in message:
        if child.tag in JMI_TAGS:
            return child
    return None


def _is_jmi(message: Element) -> Element | None:
    if message.get("type", "normal") not in ("chat", "normal"):
        return None
    return jmi_payload(message)


def _sender(message: Element) -> JID | None:
    try:
        return JID.parse(message.get("from") or "")
    except ValueError:
        return None


@dataclass
class PendingCall:
    """A propose sent to a bare JID that is still ringing."""

    caller: JID  # the full JID that proposed
    callee: JID  # bare
    sid: str
    propose: Element  # as the callee's resources got it (with its stanza-id)
    started: datetime
    rung: list[Session] = field(default_factory=list)  # the sessions that have it
    queued_offline: bool = False  # went to the offline queue: flush delivers it first
    timer: asyncio.TimerHandle | None = None


class Jingle(Module):
    name = "jingle"
    options_class = JingleOptions
    features = (NS_JMI, NS_JINGLE)

    def __init__(self, host: Host, options: JingleOptions) -> None:
        super().__init__(host, options)
        # callee bare JID → (caller bare JID, sid) → call
        self.pending: dict[JID, dict[tuple[JID, str], PendingCall]] = {}
        self._offline_call_hooks: list[OfflineCallHook] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._throttle: FailureThrottle | None = None
        self.anchor: Any = None  # voip.relay.Anchor in relay mode (aiortc imported only then)
        self.voicemail: Voicemail | None = None
        self._upload: HttpUpload | None = None
        if options.max_calls_per_minute:
            self._throttle = FailureThrottle(options.max_calls_per_minute, RATE_WINDOW, RATE_WINDOW)

    def setup(self) -> None:
        router = self.host.router
        # Ahead of carbons (10) and the archive (50): a propose over the limit is not copied.
        router.add_hook("message/sent", self.on_sent, priority=200)
        router.add_hook("message/bare", self.on_bare)
        router.on_available(self.on_available)
        if self.options.media == "relay":
            from voip.relay import Anchor

            self.anchor = Anchor(
                router,
                ring_timeout=self.options.ring_timeout,
                media_timeout=self.options.relay_media_timeout,
                passthrough=self.options.relay_forward == "passthrough",
                port_range=self.options.relay_port_range,
                public_address=self.options.relay_public_address,
                shared_port=self.options.relay_shared_port,
            )
            router.add_hook("iq/full", self.anchor.on_iq, priority=100)
        if self.options.voicemail:
            self._setup_voicemail()

    def _setup_voicemail(self) -> None:
        from xmpp_server.modules.upload import HttpUpload

        upload = self.host.modules.get("upload")
        if not isinstance(upload, HttpUpload) or not upload.active:
            log.warning("modules.jingle.voicemail needs the upload module and [http]: no voicemail")
            return
        from voip.relay import HostSockets, parse_port_range
        from voip.voicemail import Voicemail

        self._upload = upload
        # The relay's port range and public address apply to voicemail's legs too.
        port_range = parse_port_range(self.options.relay_port_range)
        public_address = self.options.relay_public_address or None
        binder = None
        if port_range is not None or public_address is not None:
            binder = HostSockets(port_range=port_range, public_address=public_address)
        self.voicemail = Voicemail(
            self.host.router,
            on_end=self._voicemail_ended,
            max_seconds=self.options.voicemail_max_seconds,
            host_sockets=binder,
        )
        # Ahead of the relay's anchor: a session with the voicemail JID is never anchored.
        self.host.router.add_hook("iq/full", self.voicemail.on_iq, priority=150)

    async def stop(self) -> None:
        for calls in self.pending.values():
            for call in calls.values():
                if call.timer is not None:
                    call.timer.cancel()
        self.pending.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.voicemail is not None:
            await self.voicemail.close()
        if self.anchor is not None:
            await self.anchor.close()

    # -- push hook point ------------------------------------------------------------

    def add_offline_call_hook(self, hook: OfflineCallHook) -> None:
        """Run ``hook`` for every call proposed to an account with no available resource
        (a push module wakes the callee's phone with VoIP priority here)."""
        self._offline_call_hooks.append(hook)

    async def on_call_for_offline(self, user: JID, propose: Element) -> None:
        """A propose reached ``user`` (bare) while none of its resources is available; it is
        about to go to the offline queue. A failing hook never costs the call."""
        for hook in self._offline_call_hooks:
            try:
                await hook(user, propose)
            except Exception:
                log.exception("offline call hook failed for %s", user)

    # -- the messages -----------------------------------------------------------------

    async def on_sent(self, origin: Session | None, message: Element, to: JID) -> bool:
        """A client's JMI message: the rate limit, and the end of a call that rings."""
        jmi = _is_jmi(message)
        if jmi is None or origin is None:
            return False
        sender = origin.jid
        sid = jmi.get("id") or ""
        tag = jmi.tag
        if tag == PROPOSE:
            self._check_rate(sender.bare)
        elif tag == RETRACT and to.resource is not None:
            # Retracts belong on the bare JID (where on_bare records the missed call after the
            # retract itself); one to a single resource still ends the call.
            self._end(to.bare, sender.bare, sid, missed="retract")
        elif tag == qn(NS_JMI, "accept"):
            # Old-style (XEP-0353 < 0.6): to the responder's own bare JID; caller unknown.
            for call in list(self.pending.get(sender.bare, {}).values()):
                if call.sid == sid:
                    self._end(call.callee, call.caller.bare, sid)
        elif tag in (qn(NS_JMI, "proceed"), qn(NS_JMI, "reject")):
            self._end(sender.bare, to.bare, sid)
        elif tag == FINISH:
            self._end(sender.bare, to.bare, sid)
            self._end(to.bare, sender.bare, sid)
        if tag in (RETRACT, FINISH) and self.voicemail is not None:
            self.voicemail.withdraw(str(sender), sid)
        return False

    def _check_rate(self, user: JID) -> None:
        if self._throttle is None:
            return
        key, now = str(user), time.monotonic()
        wait = self._throttle.blocked(key, now)
        if wait:
            raise ResourceConstraint(f"too many calls; try again in {int(wait) + 1} s")
        self._throttle.failure(key, now)  # counts the call

    async def on_bare(self, origin: Session | None, message: Element, to: JID) -> bool:
        """A JMI message to an account: to all its available resources (non-negative
        priority), or, with none, on to the offline queue."""
        jmi = _is_jmi(message)
        if jmi is None:
            return False
        router = self.host.router
        sessions = [s for s in router.available(to) if s.priority >= 0]
        call = self._ringing(message, jmi, to, sessions) if jmi.tag == PROPOSE else None
        retracted = (
            self._end(to, _sender(message), jmi.get("id") or "") if jmi.tag == RETRACT else None
        )
        if sessions:
            for session in sessions:
                session.deliver(message)
            router.delivered(message, to, sessions)
        else:
            if call is not None:
                call.queued_offline = True
                await self.on_call_for_offline(to, message)
            await router.deliver_message_to_bare(origin, message, to)  # the offline queue
            if call is not None and self.voicemail is not None:
                self._ring_expired(to, call.caller.bare, call.sid)
        if retracted is not None:
            # After the retract, so every device and the offline queue have them in order.
            await self._record_missed(retracted, "retract")
        return True

    def _ringing(
        self, message: Element, propose: Element, to: JID, sessions: list[Session]
    ) -> PendingCall | None:
        """Remember a propose until it is answered or times out."""
        try:
            caller = JID.parse(message.get("from") or "")
        except ValueError:
            return None
        sid = propose.get("id")
        if not sid or caller.local is None:
            return None
        calls = self.pending.setdefault(to, {})
        key = (caller.bare, sid)
        stale = [calls.pop(key)] if key in calls else []  # the same call proposed again
        while len(calls) >= MAX_PENDING_PER_USER:
            stale.append(calls.pop(next(iter(calls))))  # the oldest is forgotten, unrecorded
        for old in stale:
            if old.timer is not None:
                old.timer.cancel()
        call = PendingCall(caller, to, sid, clone(message), datetime.now(UTC), list(sessions))
        delay = self.options.ring_timeout
        if self.voicemail is not None:
            delay = min(delay, self.options.voicemail_after)
        call.timer = asyncio.get_running_loop().call_later(
            delay, self._ring_expired, to, caller.bare, sid
        )
        calls[key] = call
        return call

    def _end(
        self, callee: JID, caller: JID | None, sid: str, missed: str | None = None
    ) -> PendingCall | None:
        """The call stops ringing, if it was; ``missed`` (retract, timeout) has a task leave
        the callee a record."""
        calls = self.pending.get(callee)
        if calls is None or caller is None:
            return None
        call = calls.pop((caller.bare, sid), None)
        if not calls:
            del self.pending[callee]
        if call is None:
            return None
        if call.timer is not None:
            call.timer.cancel()
        if missed is not None:
            self._spawn(self._record_missed(call, missed))
        return call

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ring_expired(self, callee: JID, caller: JID, sid: str) -> None:
        """Nobody answered in time (or nobody could): voicemail takes the call, if on."""
        if self.voicemail is None:
            self._end(callee, caller, sid, "timeout")
            return
        call = self._end(callee, caller, sid)
        if call is not None:
            self._spawn(self._to_voicemail(call))

    def _call_record(self, call: PendingCall, reason: str, text: str) -> Element:
        """The chat message from the domain that tells the callee about ``call``."""
        stamp = call.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        record = make("message", from_=self.host.domain, to=call.callee, type="chat", id=new_id())
        body = ET.SubElement(record, qn(NS_CLIENT, "body"))
        body.text = text
        ET.SubElement(
            record,
            qn(NS_MISSED_CALL, "x"),
            {"from": str(call.caller.bare), "sid": call.sid, "stamp": stamp, "reason": reason},
        )
        return record

    async def _record_missed(self, call: PendingCall, reason: str) -> None:
        text = f"Missed call from {call.caller.bare} at {call.started:%Y-%m-%d %H:%M:%S} UTC"
        try:
            await self.host.router.deliver(self._call_record(call, reason, text))
        except Exception:
            log.exception("could not record a missed call for %s", call.callee)

    # -- voicemail ------------------------------------------------------------------------

    def _jmi_message(self, sender: JID, to: JID, tag: str, sid: str) -> Element:
        message = make("message", from_=sender, to=to, type="chat", id=new_id())
        ET.SubElement(message, qn(NS_JMI, tag), {"id": sid})
        ET.SubElement(message, qn(NS_HINTS, "store"))
        return message

    async def _to_voicemail(self, call: PendingCall) -> None:
        """Answer ``call`` as the callee's voicemail JID, the way a device of the callee would:
        ``<accept/>`` to the callee's own account (XEP-0353 before 0.4: its other devices stop
        ringing, and a device that comes online finds it after the propose in the offline
        queue), a ``<proceed/>`` to the caller, carbon-copied to the callee's devices as a
        sent message (how XEP-0353 0.4+ clients learn the call was taken elsewhere). The
        caller then starts the Jingle session with the voicemail JID (voip.voicemail)."""
        assert self.voicemail is not None
        router = self.host.router
        callee = call.callee
        box = JID.make(callee.local, callee.domain, VOICEMAIL_RESOURCE)
        self.voicemail.expect(call.sid, str(call.caller), str(box), context=call)
        log.info("call %s from %s to %s goes to voicemail", call.sid, call.caller, callee)
        try:
            await router.deliver(self._jmi_message(box, callee, "accept", call.sid))
            proceed = self._jmi_message(box, call.caller, "proceed", call.sid)
            carbons = self.host.modules.get("carbons")
            enabled = carbons.enabled if isinstance(carbons, Carbons) else set()
            for session in router.resources(callee):
                if session.jid in enabled:
                    session.deliver(carbon("sent", clone(proceed), box, session.jid))
            await router.deliver(proceed)
        except Exception:
            log.exception("could not hand call %s to voicemail", call.sid)

    async def _voicemail_ended(self, session: VoicemailSession) -> None:
        """The recording is over: store it as the callee's upload and tell the callee (one
        message: the missed-call record with the recording), or record a missed call when
        there is nothing to keep."""
        call = session.context
        assert isinstance(call, PendingCall)
        stored = None
        if session.recording is not None:
            try:
                stored = await self._store_recording(call, session.recording)
            except Exception:
                log.exception("could not store the voicemail of call %s", call.sid)
        if stored is None:
            await self._record_missed(call, "voicemail")
            return
        url, upload = stored
        seconds = max(1, round(session.seconds))
        text = f"Voicemail from {call.caller.bare}, {seconds} s"
        record = self._call_record(call, "voicemail", text)
        oob = ET.SubElement(record, qn(NS_OOB, "x"))
        ET.SubElement(oob, qn(NS_OOB, "url")).text = url
        ET.SubElement(oob, qn(NS_OOB, "desc")).text = text
        assert self._upload is not None
        file = self._upload.file_element(upload, None)
        ET.SubElement(file, qn(NS_FILE, "length")).text = str(round(session.seconds * 1000))
        reference = ET.SubElement(record, qn(NS_REFERENCE, "reference"), {"type": "data"})
        reference.set("uri", url)
        sims = ET.SubElement(reference, qn(NS_SIMS, "media-sharing"))
        sims.append(file)
        sources = ET.SubElement(sims, qn(NS_SIMS, "sources"))
        ET.SubElement(sources, qn(NS_REFERENCE, "reference"), {"type": "data", "uri": url})
        ET.SubElement(record, qn(NS_HINTS, "store"))
        try:
            await self.host.router.deliver(record)
        except Exception:
            log.exception("could not deliver the voicemail of call %s", call.sid)

    async def _store_recording(self, call: PendingCall, data: bytes) -> tuple[str, Upload] | None:
        """Keep ``data`` as an upload of the callee (same quota, expiry, purge and GET URL
        as the files they upload); None when their quota or the size limit forbids it."""
        upload = self._upload
        assert upload is not None
        storage = self.host.storage
        owner = str(call.callee)
        options = upload.options
        if len(data) > options.max_file_size:
            log.warning("voicemail of call %s is larger than max_file_size", call.sid)
            return None
        if options.quota_per_user:
            since = datetime.now(UTC) - timedelta(seconds=options.slot_ttl)
            if await storage.uploads.usage(owner, since) + len(data) > options.quota_per_user:
                log.info("voicemail of call %s not kept: %s is over quota", call.sid, owner)
                return None
        slot = secrets.token_urlsafe(24)
        filename = f"voicemail-{call.caller.local}-{call.started:%Y%m%d-%H%M%S}.ogg"
        path = f"{slot[:2]}/{slot}"  # the upload module's layout
        await storage.uploads.create(owner, slot, filename, len(data), "audio/ogg", path)
        await upload.blobs.put(path, data, "audio/ogg")
        await storage.uploads.complete(slot, Completion(sha256=hashlib.sha256(data).hexdigest()))
        stored = await storage.uploads.get(slot)
        if stored is None:
            return None
        return upload.get_url(slot, filename), stored

    # -- resources coming online --------------------------------------------------------

    async def on_available(self, session: Session) -> None:
        """Ring a resource that comes online while a call to its account is ringing.

        Runs before the offline module's flush (the registry sets this module up first), so a
        propose still in the offline queue is left to the flush: the resource gets it once. It
        may miss it when another resource has that queued copy and has not yet acknowledged it
        (the flush skips it then); the other resources still ring."""
        calls = self.pending.get(session.jid.bare)
        if not calls or session.priority < 0:
            return
        queued: set[tuple[JID, str]] | None = None
        for key, call in list(calls.items()):
            if any(s is session for s in call.rung):
                continue
            if call.queued_offline:
                # What is still queued the offline module's flush, which runs next, delivers.
                if queued is None:
                    queued = await self._queued_proposes(session.jid.bare)
                if key in queued:
                    call.rung.append(session)
                    continue
            if calls.get(key) is not call:
                continue  # answered while we looked
            call.rung.append(session)
            copy = clone(call.propose)
            copy.set("to", str(session.jid))
            if copy.find(qn(NS_DELAY, "delay")) is None:
                stamp = call.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                ET.SubElement(
                    copy, qn(NS_DELAY, "delay"), {"from": self.host.domain, "stamp": stamp}
                )
            session.deliver(copy)

    async def _queued_proposes(self, user: JID) -> set[tuple[JID, str]]:
        """(caller, sid) of the proposes in ``user``'s offline queue."""
        found: set[tuple[JID, str]] = set()
        for _, xml in await self.host.storage.offline.fetch(str(user)):
            if "jingle-message" not in xml:
                continue
            try:
                message = fromstring(xml)
                caller = JID.parse(message.get("from") or "")
            except (ValueError, StreamError):
                continue
            propose = message.find(PROPOSE)
            if propose is not None and propose.get("id"):
                found.add((caller.bare, propose.get("id") or ""))
        return found
