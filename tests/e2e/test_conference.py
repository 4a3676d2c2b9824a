"""Audio conferences at call.localhost: four unmodified softphones call ``team@call.localhost``
like a person, each sends its own tone and hears the three others' (FFT), not its own; then
everyone hangs up and the conference is gone with its legs, sockets and tasks. Also: disco,
a full conference turning callers away, and strangers refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import DOMAIN, Client, add_user, clients, running_server
from tests.voip.test_conference import FREQUENCIES, SilentTrack, tone_levels
from tests.voip.test_softphone import jingle_iq, open_peer_connections, open_transports
from voip.conference import Participant, udp_sockets
from voip.jingle import transport_info
from voip.softphone import Call, Softphone, ToneTrack
from xmpp_server.errors import Forbidden
from xmpp_server.jid import JID
from xmpp_server.modules.conference import Conferences
from xmpp_server.stanza import make, qn
from xmpp_server.xml import Element

DEADLINE = 90.0  # four softphones and four server legs share two busy cores
SETTLE_SECONDS = 0.5
ANALYSED_SECONDS = 2.0
ROOM = f"team@call.{DOMAIN}"
NS_JMI = "urn:xmpp:jingle-message:0"


def conferences(server: Any) -> Conferences:
    module = server.host.modules["conference"]
    assert isinstance(module, Conferences)
    return module


async def heard_after(calls: list[Call], skip: float, seconds: float) -> list[Any]:
    """What each call receives from now on: ``skip`` seconds dropped, then ``seconds`` kept."""
    marks = [len(c.recorder.samples()) for c in calls]
    needed = int((skip + seconds) * 48000)
    async with asyncio.timeout(DEADLINE):
        while any(
            len(c.recorder.samples()) - m < needed for c, m in zip(calls, marks, strict=True)
        ):
            await asyncio.sleep(0.1)
    start = int(skip * 48000)
    return [c.recorder.samples()[m + start : m + needed] for c, m in zip(calls, marks, strict=True)]


async def test_four_softphones_each_hear_the_three_others(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        module = conferences(server)
        jids = [await add_user(server, name) for name in ("alice", "bob", "carol", "dave")]
        async with clients(*(Client(server, jid) for jid in jids)) as xmpp:
            await asyncio.gather(*(client.login() for client in xmpp))
            phones = [
                Softphone(client, source=lambda f=f: ToneTrack(f), ice_servers=[], timeout=DEADLINE)
                for client, f in zip(xmpp, FREQUENCIES, strict=True)
            ]
            try:
                calls = list(await asyncio.gather(*(phone.call(ROOM) for phone in phones)))
                # An ordinary call for each softphone, answered by the conference's mixer.
                assert {call.peer for call in calls} == {f"{ROOM}/mixer"}
                async with asyncio.timeout(DEADLINE):
                    await asyncio.gather(
                        *(
                            phone.wait_connected(call)
                            for phone, call in zip(phones, calls, strict=True)
                        )
                    )
                conference = module.conferences[JID.parse(ROOM)]
                legs: list[Participant] = list(conference.participants.values())
                assert {leg.key for leg in legs} == {c.boundjid.full for c in xmpp}
                for leg in legs:
                    assert "a=rtcp-mux" in leg.pc.localDescription.sdp
                    assert len(leg.udp_sockets()) == 1  # RTP and RTCP on one socket
                sockets = udp_sockets(legs)

                recordings = await heard_after(calls, SETTLE_SECONDS, ANALYSED_SECONDS)
                for own, heard in zip(FREQUENCIES, recordings, strict=True):
                    levels = tone_levels(heard, FREQUENCIES)
                    others = [levels[f] for f in FREQUENCIES if f != own]
                    # Each of the three others is a clear peak; its own tone is not there.
                    assert min(others) > 0.2, (own, levels)
                    assert levels[own] < min(others) / 10, (own, levels)
                    assert float(np.abs(heard).max()) > 0.1  # real audio, not near-silence

                # Trickled candidates reach the leg; a session the mixer does not know is refused.
                alice, placed = xmpp[0], calls[0]
                trickle = transport_info(
                    sid=placed.sid,
                    initiator=placed.initiator,
                    content=placed.content,
                    creator="initiator",
                    ufrag=None,
                    pwd=None,
                    candidates=["candidate:9 1 udp 1 192.0.2.99 9 typ host"],
                )
                await jingle_iq(alice, f"{ROOM}/mixer", trickle)
                trickle.set("sid", "nosuchsession")
                with pytest.raises(IqError) as refused:
                    await jingle_iq(alice, f"{ROOM}/mixer", trickle)
                assert refused.value.iq["error"]["condition"] == "item-not-found"

                # Dave's client drops off without hanging up: his leg goes, the others stay
                # and no longer hear him.
                dave_leg = conference.participants[xmpp[3].boundjid.full]
                await xmpp[3].close()
                async with asyncio.timeout(DEADLINE):
                    await dave_leg.left.wait()
                assert dave_leg.reason == "gone" and len(conference.participants) == 3
                remaining = FREQUENCIES[:3]
                recordings = await heard_after(calls[:3], SETTLE_SECONDS, 1.0)
                for own, heard in zip(remaining, recordings, strict=True):
                    levels = tone_levels(heard, FREQUENCIES)
                    others = [levels[f] for f in remaining if f != own]
                    assert min(others) > 0.2, (own, levels)
                    assert max(levels[own], levels[FREQUENCIES[3]]) < min(others) / 10, levels

                for phone, call in zip(phones[:3], calls[:3], strict=True):
                    await phone.hangup(call)
                async with asyncio.timeout(DEADLINE):
                    while module.conferences or module.tasks or conference.tasks:
                        await asyncio.sleep(0.05)
                assert [leg.reason for leg in legs].count("success") == 3
                assert all(leg.pc.connectionState == "closed" for leg in legs)
                assert len(sockets) == 4 and all(s.fileno() == -1 for s in sockets)
                assert conference.empty and len(conference.mixer) == 0
                assert module.proposals == {} and module.joining == {}
                assert all(phone.calls == {} for phone in phones[:3])
            finally:
                for phone in phones:
                    await phone.close()
            assert open_peer_connections() == []
            assert open_transports() == []


async def test_a_silent_participant_is_ended_by_the_conference(
    migrated_db_url: str, tmp_path: Path
) -> None:
    settings = {"modules": {"conference": {"media_timeout": 1.0}}}
    async with running_server(migrated_db_url, tmp_path, settings) as server:
        module = conferences(server)
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
            phone = Softphone(alice, source=SilentTrack, ice_servers=[], timeout=DEADLINE)
            try:
                call = await phone.call(ROOM)
                async with asyncio.timeout(DEADLINE):
                    await call.ended.wait()  # the mixer's session-terminate
                    while module.conferences or module.tasks:
                        await asyncio.sleep(0.05)
                assert call.reason == "timeout"
            finally:
                await phone.close()


async def test_service_disco_names_an_audio_conference(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
            disco = alice.plugin["xep_0030"]
            for target in (f"call.{DOMAIN}", ROOM):
                info = await disco.get_info(jid=target, timeout=DEADLINE)
                identities = {(c, t) for c, t, _, _ in info["disco_info"]["identities"]}
                assert identities == {("conference", "audio")}
                features = set(info["disco_info"]["features"])
                assert {
                    "urn:xmpp:jingle:1",
                    "urn:xmpp:jingle:apps:rtp:1",
                    "urn:xmpp:jingle:apps:rtp:audio",
                    "urn:xmpp:jingle:transports:ice-udp:1",
                    "urn:xmpp:jingle:apps:dtls:0",
                    NS_JMI,
                } <= features
            items = await disco.get_items(jid=DOMAIN, timeout=DEADLINE)
            assert (f"call.{DOMAIN}", None, "Audio conferences") in items["disco_items"]["items"]


def jmi(client: Client, action: str, sid: str) -> None:
    message = client.Message()
    message["to"] = ROOM
    message["type"] = "chat"
    message.xml.append(Element(qn(NS_JMI, action), {"id": sid}))
    message.send()


async def test_a_full_conference_rejects_callers_and_strangers_are_refused(
    migrated_db_url: str, tmp_path: Path
) -> None:
    settings = {"modules": {"conference": {"max_participants": 2}}}
    async with running_server(migrated_db_url, tmp_path, settings) as server:
        module = conferences(server)
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()
            answers: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()

            def on_jmi(message: Any) -> None:
                for el in message.xml:
                    if el.tag.startswith(f"{{{NS_JMI}}}"):
                        action = el.tag.partition("}")[2]
                        answers.put_nowait((action, el.get("id"), message))

            for action in ("proceed", "reject"):
                alice.register_handler(
                    Callback(
                        f"jmi-{action}",
                        MatchXPath(f"{{jabber:client}}message/{{{NS_JMI}}}{action}"),
                        on_jmi,
                    )
                )

            async def answer() -> tuple[str, str, Any]:
                async with asyncio.timeout(DEADLINE):
                    return await answers.get()

            # Two proceeded callers hold the two places until they join or give up...
            for sid in ("s1", "s2"):
                jmi(alice, "propose", sid)
                action, got, message = await answer()
                assert (action, got, str(message["from"])) == ("proceed", sid, f"{ROOM}/mixer")
            # ... so a third is turned away as busy.
            jmi(alice, "propose", "s3")
            action, got, message = await answer()
            assert (action, got) == ("reject", "s3")
            reject = message.xml.find(qn(NS_JMI, "reject"))
            assert reject.find("{urn:xmpp:jingle:1}reason/{urn:xmpp:jingle:1}busy") is not None
            # A caller that withdraws frees its place.
            jmi(alice, "retract", "s1")
            jmi(alice, "propose", "s4")
            assert (await answer())[:2] == ("proceed", "s4")
            assert len(module.proposals[JID.parse(ROOM)]) == 2

        # Only the server's own users may call in (strangers could only come through a
        # component, which gets no error back, so the module's answer is checked directly).
        stranger = make("message", to=ROOM, from_="mallory@elsewhere.example/x", type="chat")
        stranger.append(Element(qn(NS_JMI, "propose"), {"id": "s5"}))
        with pytest.raises(Forbidden):
            await module.on_stanza(None, stranger, JID.parse(ROOM))
        # Alice's session closed: the places she held are free again.
        async with asyncio.timeout(DEADLINE):
            while module.proposals:
                await asyncio.sleep(0.05)


async def test_stopping_the_server_ends_its_conferences(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        module = conferences(server)
        alice = Client(server, await add_user(server, "alice"))
        phone = Softphone(alice, source=lambda: ToneTrack(440.0), ice_servers=[], timeout=DEADLINE)
        try:
            await alice.login()
            call = await phone.call(ROOM)
            async with asyncio.timeout(DEADLINE):
                await phone.wait_connected(call)
            conference = module.conferences[JID.parse(ROOM)]
            [leg] = conference.participants.values()
            sockets = leg.udp_sockets()
            await server.stop()  # (again on leaving the block: harmless)
            assert leg.reason == "gone" and module.conferences == {}
            assert module.tasks == set() and conference.tasks == set()
            assert len(sockets) == 1 and sockets[0].fileno() == -1
        finally:
            await phone.close()
            await alice.close()
