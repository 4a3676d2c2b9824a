"""Audio conferences at ``call.<domain>``: a Jingle endpoint that mixes.

A conference is a JID of the service, one per room name (``team@call.<domain>``), called like
a person: a XEP-0353 ``<propose/>`` to it is answered with ``<proceed/>`` from the
conference's mixer (``team@call.<domain>/mixer``), and the caller's Jingle session-initiate
to the mixer with a session-accept carrying the server's own leg (ICE-UDP candidates, DTLS
fingerprint, rtcp-mux, Opus; :class:`voip.conference.Conference`). Each participant hears the
others, not itself. The conference exists while someone is in it or about to join; the last
one out frees its sockets and tasks.

* **Only users of this server join**; anyone else's propose or Jingle request is answered
  ``forbidden``. There is no membership list: whoever knows the name may join, as with a
  dial-in number.
* **Full is full**: with ``max_participants`` in the conference (those proceeded but not
  yet joined count too) a propose gets ``<reject/>`` with ``<busy/>``, and a session-initiate
  that was not proposed ``resource-constraint``.
* **A leg ends** with the participant's session-terminate, when its XMPP session closes, when
  its connection fails or sends no audio for ``media_timeout`` seconds (the participant then
  gets a session-terminate), or when nobody sends the session-initiate ``join_timeout``
  seconds after a proceed (the slot is freed).

aiortc is imported when the first conference starts, so servers that never host one do not
pay for it; the module is on by default only where aiortc is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xmpp_server.errors import (
    BadRequest,
    FeatureNotImplemented,
    Forbidden,
    ItemNotFound,
    ResourceConstraint,
    ServiceUnavailable,
)
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import iq_result, make, new_id, payload, qn
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from voip.conference import Conference, Participant
    from xmpp_server.server import Host

log = logging.getLogger("natterd.conference")

NS_JMI = "urn:xmpp:jingle-message:0"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_RTP = "urn:xmpp:jingle:apps:rtp:1"
NS_RTP_AUDIO = "urn:xmpp:jingle:apps:rtp:audio"
NS_ICE_UDP = "urn:xmpp:jingle:transports:ice-udp:1"
NS_DTLS = "urn:xmpp:jingle:apps:dtls:0"
NS_INFO = "http://jabber.org/protocol/disco#info"
NS_ITEMS = "http://jabber.org/protocol/disco#items"
NS_PING = "urn:xmpp:ping"
MIXER = "mixer"
"""The resource of a conference's JID that answers calls."""
FEATURES = (
    NS_INFO,
    NS_ITEMS,
    NS_PING,
    NS_JMI,
    NS_JINGLE,
    NS_RTP,
    NS_RTP_AUDIO,
    NS_ICE_UDP,
    NS_DTLS,
)


def relay_available() -> bool:
    """Whether the media stack (aiortc, PyAV) is installed, so conferences can run."""
    return all(importlib.util.find_spec(name) is not None for name in ("aiortc", "av"))


@dataclass(frozen=True)
class ConferenceOptions:
    host: str = ""
    """The service's domain; empty: ``call.`` and the server's domain."""
    max_participants: int = field(default=16, metadata={"min": 1, "max": 1000})
    """Most participants of one conference (each costs an Opus decode and encode)."""
    media_timeout: float = field(default=30.0, metadata={"gt": 0})
    """Seconds without audio from a participant after which its leg is ended."""
    join_timeout: float = field(default=30.0, metadata={"gt": 0})
    """Seconds a proceeded call may take to send its session-initiate (its slot is held)."""
    request_timeout: float = field(default=10.0, metadata={"gt": 0})
    """Seconds to wait for a participant to acknowledge the session-accept."""


def service_domain(host: str, server_domain: str) -> str:
    return JID.parse(host or f"call.{server_domain}").domain


@dataclass
class _Proposal:
    """A caller that got ``<proceed/>`` and holds a slot until it sends session-initiate."""

    caller: str  # full JID
    sid: str
    timer: asyncio.TimerHandle | None = None


class Conferences(Module):
    """The ``call.<domain>`` service: signalling for every conference, one
    :class:`voip.conference.Conference` (legs and mixer) per conference that has someone in it."""

    name = "conference"
    options_class = ConferenceOptions
    enabled_by_default = relay_available()

    def __init__(self, host: Host, options: ConferenceOptions) -> None:
        super().__init__(host, options)
        self.domain = service_domain(options.host, host.domain)
        self.conferences: dict[JID, Conference] = {}  # by the conference's bare JID
        self.proposals: dict[JID, dict[tuple[str, str], _Proposal]] = {}
        self.joining: dict[JID, int] = {}  # session-initiates being answered, per conference
        self.tasks: set[asyncio.Task[Any]] = set()

    def setup(self) -> None:
        router = self.host.router
        router.add_domain(self.domain, self.on_stanza)
        router.on_unbound(self.on_session_closed)

    def disco_items(self) -> list[tuple[str, str]]:
        """Items on the server's disco#items: this service."""
        return [(self.domain, "Audio conferences")]

    async def stop(self) -> None:
        for proposals in self.proposals.values():
            for proposal in proposals.values():
                if proposal.timer is not None:
                    proposal.timer.cancel()
        self.proposals.clear()
        for room, conference in list(self.conferences.items()):
            self.conferences.pop(room, None)
            for participant in await conference.close("gone"):
                self._terminate(room, participant.key, participant.sid, "gone")
        if self.tasks:  # the session-terminates go out (local deliveries: at once)
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def mixer_jid(self, room: JID) -> JID:
        return JID.make(room.local, room.domain, MIXER)

    def occupancy(self, room: JID) -> int:
        """Participants in the conference plus those proceeded or joining."""
        conference = self.conferences.get(room)
        return (
            (len(conference.participants) if conference is not None else 0)
            + len(self.proposals.get(room, {}))
            + self.joining.get(room, 0)
        )

    # -- routing --------------------------------------------------------------------

    async def on_stanza(self, origin: Session | None, stanza: Element, to: JID) -> None:
        kind = stanza.tag.rpartition("}")[2]
        type_ = stanza.get("type")
        if kind == "iq" and type_ in ("result", "error"):
            return  # answers to our requests were taken by the router
        if kind == "presence" or type_ == "error":
            return
        sender = JID.parse(stanza.get("from") or self.host.domain)
        if kind == "iq":
            if to.local is None:
                self._service_iq(origin, stanza)
            else:
                await self._room_iq(origin, stanza, sender, to)
        elif kind == "message" and to.local is not None:
            self._message(stanza, sender, to.bare)

    def _check_local(self, sender: JID) -> None:
        if sender.domain != self.host.domain or sender.local is None or sender.resource is None:
            raise Forbidden(f"only users of {self.host.domain} may join conferences")

    def _reply(self, origin: Session | None, iq: Element, *payloads: Element) -> None:
        reply = iq_result(iq, *payloads)
        if origin is not None:
            origin.deliver(reply)
        else:
            self._spawn(self.host.router.deliver(reply))

    # -- XEP-0353 ---------------------------------------------------------------------

    def _message(self, message: Element, sender: JID, room: JID) -> None:
        jmi = next((el for el in message if el.tag.startswith(f"{{{NS_JMI}}}")), None)
        if jmi is None:
            raise ServiceUnavailable("a conference takes calls, not messages")
        self._check_local(sender)
        action, sid = jmi.tag.rpartition("}")[2], jmi.get("id") or ""
        if not sid:
            raise BadRequest("a call needs an id")
        caller = str(sender)
        if action == "propose":
            if self.occupancy(room) >= self.options.max_participants:
                log.info("conference %s is full: %s turned away", room, caller)
                self._jmi(room, caller, "reject", sid, busy=True)
                return
            proposal = _Proposal(caller, sid)
            proposal.timer = asyncio.get_running_loop().call_later(
                self.options.join_timeout, self._forget, room, caller, sid
            )
            self.proposals.setdefault(room, {})[(caller, sid)] = proposal
            self._jmi(room, caller, "proceed", sid)
        elif action == "retract":
            self._forget(room, caller, sid)
        # ringing, accept, reject, proceed, finish: nothing to do for a conference.

    def _jmi(self, room: JID, to: str, action: str, sid: str, *, busy: bool = False) -> None:
        message = make("message", from_=self.mixer_jid(room), to=to, type="chat", id=new_id())
        element = ET.SubElement(message, qn(NS_JMI, action), {"id": sid})
        if busy:
            reason = ET.SubElement(element, qn(NS_JINGLE, "reason"))
            ET.SubElement(reason, qn(NS_JINGLE, "busy"))
            ET.SubElement(reason, qn(NS_JINGLE, "text")).text = "the conference is full"
        ET.SubElement(message, qn("urn:xmpp:hints", "store"))
        self._spawn(self.host.router.deliver(message))

    def _forget(self, room: JID, caller: str, sid: str) -> _Proposal | None:
        proposals = self.proposals.get(room)
        proposal = proposals.pop((caller, sid), None) if proposals is not None else None
        if proposals is not None and not proposals:
            del self.proposals[room]
        if proposal is not None and proposal.timer is not None:
            proposal.timer.cancel()
        return proposal

    # -- iqs ------------------------------------------------------------------------

    def _service_iq(self, origin: Session | None, iq: Element) -> None:
        query = payload(iq)
        ns = query.tag[1:].partition("}")[0] if query is not None else ""
        if iq.get("type") != "get":
            raise ServiceUnavailable()
        if ns == NS_INFO:
            self._reply(origin, iq, self._info("Audio conferences"))
        elif ns == NS_ITEMS:
            self._reply(origin, iq, Element(qn(NS_ITEMS, "query")))  # conferences are unlisted
        elif ns == NS_PING:
            self._reply(origin, iq)
        else:
            raise ServiceUnavailable()

    def _info(self, name: str) -> Element:
        query = Element(qn(NS_INFO, "query"))
        identity = {"category": "conference", "type": "audio", "name": name}
        ET.SubElement(query, qn(NS_INFO, "identity"), identity)
        for feature in FEATURES:
            ET.SubElement(query, qn(NS_INFO, "feature"), {"var": feature})
        return query

    async def _room_iq(self, origin: Session | None, iq: Element, sender: JID, to: JID) -> None:
        query = payload(iq)
        if query is None:
            raise BadRequest("an iq needs a payload")
        room = to.bare
        if query.tag == qn(NS_JINGLE, "jingle") and iq.get("type") == "set":
            self._check_local(sender)
            await self._jingle(origin, iq, query, str(sender), room)
        elif query.tag == qn(NS_INFO, "query") and iq.get("type") == "get":
            self._reply(origin, iq, self._info(room.local or ""))
        elif query.tag == qn(NS_PING, "ping") and iq.get("type") == "get":
            self._reply(origin, iq)
        else:
            raise ServiceUnavailable()

    async def _jingle(
        self, origin: Session | None, iq: Element, jingle: Element, sender: str, room: JID
    ) -> None:
        action, sid = jingle.get("action", ""), jingle.get("sid", "")
        if not sid:
            raise BadRequest("a Jingle session needs a sid")
        conference = self.conferences.get(room)
        participant = conference.participants.get(sender) if conference is not None else None
        if participant is not None and participant.sid != sid:
            participant = None
        if action == "session-initiate":
            if self._forget(room, sender, sid) is None:
                if self.occupancy(room) >= self.options.max_participants:
                    raise ResourceConstraint("the conference is full")
            self.joining[room] = self.joining.get(room, 0) + 1
            self._reply(origin, iq)
            self._spawn(self._join(room, sender, jingle))
            return
        if participant is None or conference is None:
            raise ItemNotFound("no such session")
        if action == "session-terminate":
            self._reply(origin, iq)
            await conference.leave(sender, _reason(jingle) or "success", sid=sid)
            await self._drop_if_empty(room)
        elif action == "transport-info":
            self._reply(origin, iq)
            await self._candidates(conference, sender, jingle)
        elif action == "session-info":
            self._reply(origin, iq)  # ringing, mute, hold: nothing to do for a mixer
        else:
            raise FeatureNotImplemented(f"{action} is not supported by conferences")

    async def _join(self, room: JID, caller: str, initiate: Element) -> None:
        from voip.jingle import jingle_to_sdp, sdp_to_jingle

        sid = initiate.get("sid", "")
        answer: str | None = None
        try:
            offer = jingle_to_sdp(initiate, role="offer")
            conference = self._conference(room)
            _, answer = await conference.join(caller, sid, offer)
        except Exception as exc:
            log.warning("%s could not join conference %s: %r", caller, room, exc)
        finally:
            self.joining[room] -= 1
            if not self.joining[room]:
                del self.joining[room]
        if answer is None:
            self._terminate(room, caller, sid, "failed-application")
            await self._drop_if_empty(room)
            return
        accept = sdp_to_jingle(
            answer,
            action="session-accept",
            sid=sid,
            initiator=initiate.get("initiator") or caller,
            responder=str(self.mixer_jid(room)),
        )
        try:
            await self._request(room, caller, accept)
        except Exception as exc:
            log.info("%s did not take conference %s's accept: %r", caller, room, exc)
            if await conference.leave(caller, "failed-application", sid=sid) is not None:
                self._terminate(room, caller, sid, "failed-application")
            await self._drop_if_empty(room)

    def _conference(self, room: JID) -> Conference:
        conference = self.conferences.get(room)
        if conference is None:
            from voip.conference import Conference

            conference = Conference(
                str(room), media_timeout=self.options.media_timeout, on_leave=self._left
            )
            self.conferences[room] = conference
            log.info("conference %s started", room)
        return conference

    async def _candidates(self, conference: Conference, sender: str, jingle: Element) -> None:
        from aiortc.sdp import candidate_from_sdp

        from voip.jingle import candidate_to_sdp

        path = f"{qn(NS_ICE_UDP, 'transport')}/{qn(NS_ICE_UDP, 'candidate')}"
        for content in jingle.iterfind(qn(NS_JINGLE, "content")):
            for el in content.iterfind(path):
                try:
                    candidate = candidate_from_sdp(candidate_to_sdp(el).removeprefix("candidate:"))
                    candidate.sdpMid = content.get("name")
                    await conference.add_candidate(sender, candidate)
                except Exception as exc:
                    log.debug("candidate from %s refused: %r", sender, exc)

    # -- ends -----------------------------------------------------------------------

    async def _left(self, conference: Conference, participant: Participant, reason: str) -> None:
        """The conference removed a leg by itself (timeout, failed connection)."""
        room = JID.parse(conference.name)
        self._terminate(room, participant.key, participant.sid, reason)
        await self._drop_if_empty(room)

    async def on_session_closed(self, session: Session) -> None:
        """A participant's XMPP session ended: its legs and held slots go too."""
        jid = str(session.jid)
        for room, proposals in list(self.proposals.items()):
            for caller, sid in list(proposals):
                if caller == jid:
                    self._forget(room, caller, sid)
        for room, conference in list(self.conferences.items()):
            if await conference.leave(jid, "gone") is not None:
                await self._drop_if_empty(room)

    async def _drop_if_empty(self, room: JID) -> None:
        conference = self.conferences.get(room)
        if conference is None or not conference.empty or self.joining.get(room):
            return
        del self.conferences[room]
        await conference.close()
        log.info("conference %s ended", room)

    def _terminate(self, room: JID, to: str, sid: str, reason: str) -> None:
        """Tell a participant its session is over (not waiting for the answer)."""
        jingle = Element(
            qn(NS_JINGLE, "jingle"), {"action": "session-terminate", "sid": sid, "initiator": to}
        )
        reason_el = ET.SubElement(jingle, qn(NS_JINGLE, "reason"))
        ET.SubElement(reason_el, qn(NS_JINGLE, reason))
        iq = make("iq", type="set", id=new_id(), from_=self.mixer_jid(room), to=to)
        iq.append(jingle)
        self._spawn(self.host.router.deliver(iq))

    # -- requests to participants ---------------------------------------------------

    async def _request(self, room: JID, to: str, jingle: Element) -> Element:
        """An iq set from the conference's mixer to ``to``; its result, or RuntimeError."""
        return await self.host.router.request_set(
            str(self.mixer_jid(room)), to, jingle, self.options.request_timeout
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _reason(jingle: Element) -> str | None:
    reason = jingle.find(qn(NS_JINGLE, "reason"))
    for child in reason if reason is not None else []:
        if child.tag != qn(NS_JINGLE, "text"):
            return child.tag.partition("}")[2]
    return None
