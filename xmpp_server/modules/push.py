"""XEP-0357 push notifications: wake a sleeping phone through its app server.

A client enables push with the JID of an app server (an XEP-0114 component such as
``natterd push``), a node and optional publish options (XEP-0357 §5: a secret, and for
``natterd push`` the ``device_type``, ``fcm`` or ``apns``; the node is the device token).
Registrations are stored per account, app server and node.

The account's app servers are notified when a message

* is stored offline for it (the ``message/offline`` path, once the offline module kept it),
* or is written to sessions that are all inactive (XEP-0352) or detached (XEP-0198,
  waiting for resumption): the client will not see it until the OS wakes the app.

The notification is a pubsub publish from the server's JID to the app server::

    <pubsub xmlns='http://jabber.org/protocol/pubsub'>
      <publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'>
        <x xmlns='jabber:x:data' type='form'>
          FORM_TYPE = urn:xmpp:push:summary
          message-count            messages notified since the account last came online
          last-message-sender      the sender's bare JID (include_sender)
          last-message-body        the body (include_body; off by default: privacy)
          last-message-priority    "normal", or "high" for a call (below)
          call-id, call-media      calls only: the XEP-0353 propose id and its media
        </x></notification></item></publish>
      <publish-options><x type='submit'>FORM_TYPE publish-options + the stored fields</x>
      </publish-options></pubsub>

Calls: a XEP-0353 propose to an account with no available resource (the jingle module's
offline call hook), or written to sessions that all sleep, is notified at once with
``last-message-priority = high`` (VoIP push); a propose kept offline is not notified again.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xmpp_server.errors import BadRequest, Forbidden, JidMalformed, NotAcceptable
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.jingle import Jingle
from xmpp_server.modules.offline import Offline, worth_storing
from xmpp_server.router import IqKey, Session
from xmpp_server.stanza import iq_addresses, iq_result, new_id, qn
from xmpp_server.storage import StoredPushRegistration
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.server import Host

log = logging.getLogger("natterd.push")

NS_PUSH = "urn:xmpp:push:0"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_DATA = "jabber:x:data"
NS_JMI = "urn:xmpp:jingle-message:0"
NS_DELAY = "urn:xmpp:delay"
CACHE_SIZE = 10_000  # accounts whose registrations are kept in memory
PROPOSE = qn(NS_JMI, "propose")
SUMMARY = "urn:xmpp:push:summary"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"


@dataclass(frozen=True)
class PushOptions:
    include_body: bool = False
    include_sender: bool = True
    max_per_user: int = field(default=10, metadata={"min": 1})


def form_values(form: Element | None) -> dict[str, str]:
    """A data form's fields (first value each), FORM_TYPE left out."""
    if form is None:
        return {}
    values: dict[str, str] = {}
    for f in form.findall(qn(NS_DATA, "field")):
        var = f.get("var", "")
        if var and var != "FORM_TYPE":
            values[var] = f.findtext(qn(NS_DATA, "value")) or ""
    return values


def _form(type_: str, form_type: str, fields: dict[str, str]) -> Element:
    x = Element(qn(NS_DATA, "x"), {"type": type_})
    for var, value in {"FORM_TYPE": form_type, **fields}.items():
        f = ET.SubElement(x, qn(NS_DATA, "field"), {"var": var})
        ET.SubElement(f, qn(NS_DATA, "value")).text = value
    return x


def notification_iq(
    domain: str, registration: StoredPushRegistration, summary: dict[str, str]
) -> Element:
    iq = Element(
        qn("jabber:client", "iq"),
        {"type": "set", "from": domain, "to": registration.service, "id": new_id()},
    )
    pubsub = ET.SubElement(iq, qn(NS_PUBSUB, "pubsub"))
    publish = ET.SubElement(pubsub, qn(NS_PUBSUB, "publish"), {"node": registration.node})
    item = ET.SubElement(publish, qn(NS_PUBSUB, "item"))
    notification = ET.SubElement(item, qn(NS_PUSH, "notification"))
    notification.append(_form("form", SUMMARY, summary))
    if registration.options:
        options = ET.SubElement(pubsub, qn(NS_PUBSUB, "publish-options"))
        options.append(_form("submit", PUBLISH_OPTIONS, registration.options))
    return iq


class Push(Module):
    name = "push"
    options_class = PushOptions
    account_features = (NS_PUSH,)

    def __init__(self, host: Host, options: PushOptions) -> None:
        super().__init__(host, options)
        self.counts: dict[JID, int] = {}  # messages notified since the account was online
        # Registrations by account, most recently used last: every offline message and every
        # message to a sleeping phone asks, most accounts have none. Only this process changes
        # them (enable/disable), so the cache never goes stale.
        self._cache: OrderedDict[JID, list[StoredPushRegistration]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def setup(self) -> None:
        router = self.host.router
        router.add_iq(IqKey("set", "bare", NS_PUSH, "enable"), self.on_enable)
        router.add_iq(IqKey("set", "bare", NS_PUSH, "disable"), self.on_disable)
        # Ahead of the offline module's hook (0): it stores, then we notify.
        router.add_hook("message/offline", self.on_offline, priority=10)
        router.on_delivered(self.on_delivered)
        router.on_available(self.on_available)
        jingle = self.host.modules.get("jingle")
        if isinstance(jingle, Jingle):
            jingle.add_offline_call_hook(self.on_call_for_offline)

    # -- enable / disable (XEP-0357 §5, §6) -------------------------------------------

    def _own(self, origin: Session | None, iq: Element) -> JID:
        requester, account = iq_addresses(iq)
        if origin is None or requester.bare != account:
            raise Forbidden("you can only manage your own push notifications")
        return account

    @staticmethod
    def _service(el: Element) -> str:
        try:
            return str(JID.parse(el.get("jid", "")))
        except ValueError:
            raise JidMalformed("'jid' must be the app server's JID") from None

    async def on_enable(self, origin: Session | None, iq: Element) -> None:
        user = self._own(origin, iq)
        enable = iq.find(qn(NS_PUSH, "enable"))
        assert enable is not None and origin is not None
        service, node = self._service(enable), enable.get("node", "")
        if not node:
            raise BadRequest("'node' is required")
        options = form_values(enable.find(qn(NS_DATA, "x")))
        store = self.host.storage.push
        existing = await store.list(str(user))
        if len(existing) >= self.options.max_per_user and not any(
            r.service == service and r.node == node for r in existing
        ):
            raise NotAcceptable(f"at most {self.options.max_per_user} push registrations")
        await store.enable(str(user), service, node, options)
        self._cache.pop(user, None)
        origin.deliver(iq_result(iq))

    async def on_disable(self, origin: Session | None, iq: Element) -> None:
        user = self._own(origin, iq)
        disable = iq.find(qn(NS_PUSH, "disable"))
        assert disable is not None and origin is not None
        await self.host.storage.push.disable(
            str(user), self._service(disable), disable.get("node") or None
        )
        self._cache.pop(user, None)
        origin.deliver(iq_result(iq))

    # -- when to notify ---------------------------------------------------------------

    async def on_offline(self, origin: Session | None, message: Element, to: JID) -> bool:
        """Let the offline module store the message first (a full queue bounces it and
        nothing is notified); then notify. True: the message is handled."""
        offline = self.host.modules.get("offline")
        if not isinstance(offline, Offline):
            return False
        # Rerouted from a session that ended without acknowledging it (XEP-0198, stamped
        # before it got here): it was notified when it was written to that sleeping session.
        rerouted = origin is None and any(
            d.get("from") == self.host.domain for d in message.findall(qn(NS_DELAY, "delay"))
        )
        await offline.store(origin, message, to)
        if rerouted or not worth_storing(message) or message.find(PROPOSE) is not None:
            return True
        self._notify_message(to.bare, message)
        return True

    def on_delivered(self, message: Element, user: JID, sessions: list[Session]) -> None:
        if not sessions:
            return
        for s in sessions:  # a loop, not all(<genexpr>): this runs for every delivery
            if not (getattr(s, "inactive", False) or getattr(s, "detached", False)):
                return
        if message.get("type", "normal") not in ("chat", "normal"):
            return
        if message.find(PROPOSE) is not None:
            self._spawn(self.on_call_for_offline(user.bare, message))
        elif message.find(qn("jabber:client", "body")) is not None:
            self._notify_message(user.bare, message)

    async def on_available(self, session: Session) -> None:
        self.counts.pop(session.jid.bare, None)

    async def on_call_for_offline(self, user: JID, propose: Element) -> None:
        jmi = propose.find(PROPOSE)
        media = sorted(
            {d.get("media", "") for d in (jmi if jmi is not None else []) if d.get("media")}
        )
        summary = self._summary(user, propose, count=False)
        summary["last-message-priority"] = "high"
        summary["call-id"] = jmi.get("id", "") if jmi is not None else ""
        summary["call-media"] = " ".join(media) or "audio"
        summary.pop("last-message-body", None)
        await self._publish(user, summary)

    # -- publishing -------------------------------------------------------------------

    def _summary(self, user: JID, message: Element, *, count: bool = True) -> dict[str, str]:
        n = self.counts.get(user, 0) + (1 if count else 0)
        if count:
            self.counts[user] = n
        summary = {"message-count": str(max(n, 1))}
        if self.options.include_sender:
            try:
                summary["last-message-sender"] = str(JID.parse(message.get("from", "")).bare)
            except ValueError:
                pass
        body = message.findtext(qn("jabber:client", "body"))
        if self.options.include_body and body:
            summary["last-message-body"] = body
        summary["last-message-priority"] = "normal"
        return summary

    def _notify_message(self, user: JID, message: Element) -> None:
        self._spawn(self._publish(user, self._summary(user, message)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def registrations(self, user: JID) -> list[StoredPushRegistration]:
        cached = self._cache.get(user)
        if cached is not None:
            self._cache.move_to_end(user)
            return cached
        found = await self.host.storage.push.list(str(user))
        self._cache[user] = found
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return found

    async def _publish(self, user: JID, summary: dict[str, str]) -> None:
        try:
            registrations = await self.registrations(user)
        except Exception:
            log.exception("could not load push registrations of %s", user)
            return
        for registration in registrations:
            iq = notification_iq(self.host.domain, registration, summary)
            log.debug("push for %s to %s", user, registration.service)
            await self.host.router.deliver(iq)

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
