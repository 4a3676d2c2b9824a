"""XEP-0359 Unique and Stable Stanza IDs: every message to a local account gets a
``<stanza-id by='account'/>`` the server vouches for, so clients can deduplicate and
MAM can page by it. Stanza-ids a sender forged in our name are removed first (§3.3).
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET

from xmpp_server.jid import JID
from xmpp_server.modules.base import Module
from xmpp_server.router import Session
from xmpp_server.stanza import qn
from xmpp_server.xml import Element

NS_SID = "urn:xmpp:sid:0"
STANZA_ID = qn(NS_SID, "stanza-id")
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like the number


# Every pair of Crockford characters, indexed by 10 bits: a ULID's 130 bits are 13 lookups.
# (base64.b32encode is a Python loop and was most of an id's cost.)
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_RANDOM_BLOCK = 4096  # bytes of os.urandom fetched at once: one syscall per 409 ids


class _Entropy:
    """Random bytes in blocks: a getrandom() per message was a syscall (and a GIL release)
    on every routed message."""

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        if self._at + count > len(self._block):
            self._block, self._at = os.urandom(_RANDOM_BLOCK), 0
        out = self._block[self._at : self._at + count]
        self._at += count
        return out


_entropy = _Entropy()


def new_stanza_id(now: float | None = None) -> str:
    """48 bits of milliseconds then 80 random bits (a ULID): unique, unguessable, and in
    time order, so ids from one server sort as the messages arrived."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    v = (millis << 80) | int.from_bytes(_entropy.take(10), "big")
    # 26 characters = 130 bits: two zero bits, then the 128. Unrolled: this runs per message.
    p = _PAIRS
    return (
        p[v >> 120]
        + p[(v >> 110) & 1023]
        + p[(v >> 100) & 1023]
        + p[(v >> 90) & 1023]
        + p[(v >> 80) & 1023]
        + p[(v >> 70) & 1023]
        + p[(v >> 60) & 1023]
        + p[(v >> 50) & 1023]
        + p[(v >> 40) & 1023]
        + p[(v >> 30) & 1023]
        + p[(v >> 20) & 1023]
        + p[(v >> 10) & 1023]
        + p[v & 1023]
    )


def stamp(message: Element, by: JID) -> str:
    """Replace any stanza-id claiming to be by ``by`` with a fresh one; return its id."""
    owner = str(by)
    for old in message.findall(STANZA_ID):
        if old.get("by") == owner:
            message.remove(old)
    sid = new_stanza_id()
    ET.SubElement(message, STANZA_ID, {"id": sid, "by": owner})
    return sid


def stanza_id(message: Element, by: JID) -> str | None:
    owner = str(by)
    for sid in message.findall(STANZA_ID):
        if sid.get("by") == owner:
            return sid.get("id")
    return None


class StanzaId(Module):
    name = "stanza_id"
    features = (NS_SID,)
    account_features = (NS_SID,)

    def setup(self) -> None:
        # First of the incoming hooks: the archive stores the id stamped here.
        self.host.router.add_hook("message/incoming", self.on_incoming, priority=100)

    async def on_incoming(self, origin: Session | None, message: Element, to: JID) -> bool:
        if message.get("type") != "error":
            stamp(message, to.bare)
        return False
