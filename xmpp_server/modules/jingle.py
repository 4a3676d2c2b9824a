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
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from xmpp_server.errors import ResourceConstraint, StreamError
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import clone, make, new_id, qn
from xmpp_server.throttle import FailureThrottle
from xmpp_server.xml import NS_CLIENT, Element, fromstring

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.jingle")

NS_JMI = "urn:xmpp:jingle-message:0"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_MISSED_CALL = "urn:natter:missed-call"
NS_DELAY = "urn:xmpp:delay"

JMI_TAGS = frozenset(
    qn(NS_JMI, tag)
    for tag in ("propose", "ringing", "proceed", "accept", "reject", "retract", "finish")
)
"""Every XEP-0353 message payload (MAM archives messages carrying one)."""
PROPOSE = qn(NS_JMI, "propose")
RETRACT = qn(NS_JMI, "retract")
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
            )
            router.add_hook("iq/full", self.anchor.on_iq, priority=100)

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
        elif tag == qn(NS_JMI, "finish"):
            self._end(sender.bare, to.bare, sid)
            self._end(to.bare, sender.bare, sid)
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
        call.timer = asyncio.get_running_loop().call_later(
            self.options.ring_timeout, self._end, to, caller.bare, sid, "timeout"
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
            task = asyncio.ensure_future(self._record_missed(call, missed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return call

    async def _record_missed(self, call: PendingCall, reason: str) -> None:
        stamp = call.started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        caller = call.caller.bare
        record = make("message", from_=self.host.domain, to=call.callee, type="chat", id=new_id())
        body = ET.SubElement(record, qn(NS_CLIENT, "body"))
        body.text = f"Missed call from {caller} at {call.started:%Y-%m-%d %H:%M:%S} UTC"
        ET.SubElement(
            record,
            qn(NS_MISSED_CALL, "x"),
            {"from": str(caller), "sid": call.sid, "stamp": stamp, "reason": reason},
        )
        try:
            await self.host.router.deliver(record)
        except Exception:
            log.exception("could not record a missed call for %s", call.callee)

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
