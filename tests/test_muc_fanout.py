"""A room's fan-out yields to the event loop and keeps order: 1,000 occupants, a real Router
and an in-memory SQLite store, sessions that record what they get."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from xmpp_server.errors import StreamError
from xmpp_server.jid import JID
from xmpp_server.modules.muc import Muc, MucOptions
from xmpp_server.modules.muc.room import Room, RoomConfig
from xmpp_server.router import Router
from xmpp_server.stanza import make, qn
from xmpp_server.storage import Storage
from xmpp_server.xml import NS_CLIENT, Element

ROOM = JID.parse("big@conference.localhost")
OCCUPANTS = 1000


@dataclass(eq=False)
class RecordingSession:
    jid: JID
    available: bool = True
    priority: int = 0
    presence: Element | None = None
    interested: bool = False
    directed: set[JID] = field(default_factory=set)
    got: list[bytes] = field(default_factory=list)

    def deliver(
        self,
        stanza: Element,
        on_ack: Callable[[], None] | None = None,
        on_lost: Callable[[Element], None] | None = None,
        data: bytes | None = None,
    ) -> None:
        assert stanza.get("to") == str(self.jid)
        assert data is not None and f'to="{self.jid}"'.encode() in data
        self.got.append(data)

    def terminate(self, error: StreamError) -> None:
        raise AssertionError(error)


@pytest.fixture
async def muc() -> AsyncIterator[tuple[Muc, list[RecordingSession]]]:
    storage = await Storage.open("sqlite+aiosqlite://")

    async def exists(_: JID) -> bool:
        return True

    router = Router("localhost", exists)
    host: Any = types.SimpleNamespace(
        domain="localhost", router=router, storage=storage, modules={}, background=set()
    )
    module = Muc(host, MucOptions())
    module.setup()
    room = Room(ROOM, RoomConfig(), history_size=0)
    module.rooms[ROOM] = room
    sessions = []
    for i in range(OCCUPANTS):
        session = RecordingSession(JID.parse(f"u{i}@localhost/r"))
        await router.bind(session)
        room.enter(session.jid, f"n{i}", make("presence"), admin=False)
        sessions.append(session)
    try:
        yield module, sessions
    finally:
        await storage.close()


def groupchat(body: str) -> Element:
    message = make("message", to=ROOM, type="groupchat")
    text = Element(qn(NS_CLIENT, "body"))
    text.text = body
    message.append(text)
    return message


async def test_fan_out_to_1000_lets_other_work_run_and_keeps_order(
    muc: tuple[Muc, list[RecordingSession]],
) -> None:
    module, sessions = muc
    sender = sessions[0]
    seen_midway: list[int] = []
    loop = asyncio.get_running_loop()
    await module.host.router.route(sender, groupchat("first"))
    await module.host.router.route(sender, groupchat("second"))
    # Another client's work, queued now: it must run before the fan-out is over.
    loop.call_soon(lambda: seen_midway.append(sum(len(s.got) for s in sessions)))
    async with asyncio.timeout(30):
        while sum(len(s.got) for s in sessions) < 2 * OCCUPANTS:
            await asyncio.sleep(0)
    assert seen_midway and 0 < seen_midway[0] < 2 * OCCUPANTS
    for session in sessions:
        assert len(session.got) == 2
        assert b"first" in session.got[0] and b"second" in session.got[1]
        assert b'from="big@conference.localhost/n0"' in session.got[0]
