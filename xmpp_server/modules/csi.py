"""XEP-0352 Client State Indication: an inactive client (a phone in a pocket) is spared
traffic it does not need right now.

While a session is inactive, presence updates are held back (only the latest one per
sender is kept) and messages that carry nothing but a chat state are dropped; everything
else (messages with a body, receipts, markers, iq, groupchat, subscription requests) goes
out at once. ``<active/>`` sends the held presences, oldest sender first.

The stream offers ``<csi/>`` after authentication and hands ``<active/>``/``<inactive/>``
over as nonzas; the connection keeps the flag and asks :func:`inactive_policy` per stanza.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from xmpp_server.modules.base import Module
from xmpp_server.stanza import MESSAGE, PRESENCE, qn
from xmpp_server.xml import Element

if TYPE_CHECKING:
    from xmpp_server.connection import Connection

NS_CSI = "urn:xmpp:csi:0"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"

# Children that do not make a message worth waking a client for next to a chat state.
_NOT_CONTENT = (
    *(f"{{{ns}}}" for ns in (NS_CHATSTATES, "urn:xmpp:hints", "urn:xmpp:delay", "urn:xmpp:sid:0")),
    "{jabber:client}thread",
)


def inactive_policy(stanza: Element) -> Literal["send", "hold", "drop"]:
    if stanza.tag == PRESENCE:
        return "hold" if stanza.get("type") in (None, "unavailable") else "send"
    if stanza.tag == MESSAGE:
        has_state = any(child.tag.startswith(f"{{{NS_CHATSTATES}}}") for child in stanza)
        if has_state and all(child.tag.startswith(_NOT_CONTENT) for child in stanza):
            return "drop"
    return "send"


class Csi(Module):
    name = "csi"

    def setup(self) -> None:
        host = self.host
        settings = host.stream_settings
        host.stream_settings = replace(
            settings,
            session_features=(*settings.session_features, qn(NS_CSI, "csi")),
            nonza_namespaces=(*settings.nonza_namespaces, NS_CSI),
        )
        host.nonza_handlers[NS_CSI] = self.on_nonza
        host.inactive_policy = inactive_policy

    def on_nonza(self, connection: Connection, element: Element) -> None:
        local = element.tag.rpartition("}")[2]
        if local == "inactive":
            connection.set_inactive(True)
        elif local == "active":
            connection.set_inactive(False)
