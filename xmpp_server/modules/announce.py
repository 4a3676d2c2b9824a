"""Server announcements, as XEP-0133's "send announcement to online users", but sent by
``natterctl announce`` over the control socket (:mod:`xmpp_server.control`) rather than by
ad-hoc commands from an admin's client.

An announcement is a ``normal`` message from the server's domain with a body and optional
subject: unlike ``headline`` it may be stored, so ``--all`` reaches offline accounts through
the offline module (its limits and ``<delay/>`` stamp apply) when they next log in. Live
copies are written to the sessions directly: a notice from the server is not a conversation to
copy (carbons) or archive.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from xmpp_server.control import CommandHandler, ControlError
from xmpp_server.errors import StanzaError
from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.modules.offline import Offline
from xmpp_server.stanza import make, new_id, qn
from xmpp_server.xml import NS_CLIENT, Element

TARGETS = ("online", "all")


@dataclass(frozen=True)
class AnnounceOptions:
    control_socket: str = ""
    """The admin socket's path; "" is ``{data_dir}/natterd.ctl``, relative is to data_dir."""


def announcement(domain: str, to: JID, body: str, subject: str | None) -> Element:
    message = make("message", from_=domain, to=to, id=new_id())
    if subject:
        ET.SubElement(message, qn(NS_CLIENT, "subject")).text = subject
    ET.SubElement(message, qn(NS_CLIENT, "body")).text = body
    return message


class Announce(Module):
    name = "announce"
    options_class = AnnounceOptions

    def control_commands(self) -> dict[str, CommandHandler]:
        return {"announce": self.announce}

    async def announce(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"target": "online"|"all", "body": str, "subject": str|null}`` →
        ``{"delivered": sessions written to, "stored": accounts it was stored for}``."""
        target = request.get("target", "online")
        body = request.get("body")
        subject = request.get("subject")
        if target not in TARGETS:
            raise ControlError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        if not isinstance(body, str) or not body.strip():
            raise ControlError("the announcement needs a non-empty body")
        if subject is not None and not isinstance(subject, str):
            raise ControlError("the subject must be a string")
        offline = self.host.modules.get("offline")
        if target == "all" and not isinstance(offline, Offline):
            raise ControlError("cannot store for offline accounts: the offline module is off")
        domain = self.host.domain
        router = self.host.router
        delivered = 0
        online: set[JID] = set()
        for user in list(router.sessions):
            for session in router.available(user):
                session.deliver(announcement(domain, session.jid, body, subject))
                delivered += 1
                online.add(user)
        stored = 0
        if isinstance(offline, Offline) and target == "all":
            for account in await self.host.storage.accounts.list(domain):
                jid = JID.parse(account)
                if jid in online or router.available(jid):
                    continue
                try:
                    await offline.store(None, announcement(domain, jid, body, subject), jid)
                except StanzaError:
                    continue  # that account's offline storage is full
                stored += 1
        return {"delivered": delivered, "stored": stored}
