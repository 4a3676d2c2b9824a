"""Two softphones call each other through a running natterd: XEP-0353 then Jingle, real
aiortc media on loopback, tones detected by FFT, everything closed after hang-up."""

from __future__ import annotations

import asyncio
import gc
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceTransport
from slixmpp.exceptions import IqError

from tests.e2e.harness import (
    Client,
    add_user,
    clients,
    free_udp_tcp_port,
    running_server,
    running_server_on_free_ports,
)
from voip.jingle import NS_JINGLE, transport_info
from voip.softphone import (
    NS_EXTDISCO,
    Call,
    CallError,
    Softphone,
    ToneTrack,
    dominant_frequency,
    ice_servers_from_extdisco,
)
from xmpp_server.xml import Element, fromstring

DEADLINE = 25.0
RECORD_SECONDS = 1.0


def test_dominant_frequency_of_a_pure_tone() -> None:
    t = np.arange(48000) / 48000
    assert dominant_frequency(np.sin(2 * np.pi * 440.0 * t)) == pytest.approx(440.0, abs=0.5)
    assert dominant_frequency(np.sin(2 * np.pi * 1234.5 * t[:9600])) == pytest.approx(1234.5, abs=2)


async def test_tone_track_makes_48khz_frames_in_sequence() -> None:
    track = ToneTrack(440.0)
    first, second = await track.recv(), await track.recv()
    assert (first.sample_rate, first.samples, first.pts, second.pts) == (48000, 960, 0, 960)
    track.stop()


def test_extdisco_services_become_ice_servers() -> None:
    services = fromstring(
        f"<services xmlns='{NS_EXTDISCO}'>"
        "<service type='stun' host='127.0.0.1' port='3478' transport='udp'/>"
        "<service type='turn' host='::1' port='3478' transport='udp' restricted='1'"
        " username='1700000000:alice@localhost' password='secret'/>"
        "<service type='ftp' host='files.example' port='21'/>"
        "</services>"
    )
    servers = ice_servers_from_extdisco(services)
    assert [(s.urls, s.username, s.credential) for s in servers] == [
        ("stun:127.0.0.1:3478", None, None),
        ("turn:[::1]:3478?transport=udp", "1700000000:alice@localhost", "secret"),
    ]
    assert ice_servers_from_extdisco(None) == []


async def record(call: Call, seconds: float) -> np.ndarray:
    """``seconds`` of received audio, after the first half second (jitter buffer start)."""
    async with asyncio.timeout(DEADLINE):
        while call.recorder.seconds < seconds + 0.5:
            await asyncio.sleep(0.1)
    return call.recorder.samples()[call.recorder.sample_rate // 2 :]


async def jingle_iq(client: Client, to: str, jingle: Element) -> None:
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = to
    iq.xml.append(jingle)
    await iq.send(timeout=DEADLINE)


def open_peer_connections() -> list[RTCPeerConnection]:
    gc.collect()
    return [
        pc
        for pc in gc.get_objects()
        if isinstance(pc, RTCPeerConnection) and pc.connectionState != "closed"
    ]


def open_transports() -> list[object]:
    return [
        t
        for t in gc.get_objects()
        if isinstance(t, RTCIceTransport | RTCDtlsTransport) and t.state != "closed"
    ]


@pytest.fixture
def sqlite_url(sqlite_migrated: Path, tmp_path: Path) -> str:
    path = tmp_path / "natter.db"
    shutil.copyfile(sqlite_migrated, path)
    return f"sqlite+aiosqlite:///{path}"


async def test_two_softphones_hear_each_others_tones(sqlite_url: str, tmp_path: Path) -> None:
    async with running_server(sqlite_url, tmp_path) as server:
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        async with clients(Client(server, alice_jid), Client(server, bob_jid)) as (alice, bob):
            await alice.login()
            await bob.login()
            alice_phone = Softphone(alice, source=lambda: ToneTrack(440.0), timeout=DEADLINE)
            bob_phone = Softphone(bob, source=lambda: ToneTrack(660.0), timeout=DEADLINE)
            try:
                placing = asyncio.create_task(alice_phone.call(bob_jid))
                async with asyncio.timeout(DEADLINE):
                    incoming = await bob_phone.incoming.get()
                assert incoming.caller == alice.boundjid.full
                assert incoming.media == ["audio"]
                answered = await bob_phone.answer(incoming)
                placed = await placing
                assert placed.sid == answered.sid == incoming.sid
                assert placed.peer == bob.boundjid.full
                assert answered.initiator == alice.boundjid.full

                async with asyncio.timeout(DEADLINE):
                    await alice_phone.wait_connected(placed)
                    await bob_phone.wait_connected(answered)
                # The selected ICE pair: each side's host socket to the other's.
                alice_pair, bob_pair = placed.ice_pair(), answered.ice_pair()
                assert alice_pair is not None and bob_pair is not None
                assert alice_pair == (bob_pair[1], bob_pair[0])
                assert {c.type for c in alice_pair} == {"host"}
                assert str(alice_pair[0]) == f"host {alice_pair[0].host}:{alice_pair[0].port}"
                # A trickled candidate is taken; an action we do not implement is refused.
                await jingle_iq(
                    alice,
                    bob.boundjid.full,
                    transport_info(
                        sid=placed.sid,
                        initiator=placed.initiator,
                        content=placed.content,
                        creator="initiator",
                        ufrag=None,
                        pwd=None,
                        candidates=["candidate:9 1 udp 1 192.0.2.99 9 typ host"],
                    ),
                )
                content_add = fromstring(
                    f"<jingle xmlns='{NS_JINGLE}' action='content-add' sid='{placed.sid}'"
                    f" initiator='{placed.initiator}'/>"
                )
                with pytest.raises(IqError) as caught:
                    await jingle_iq(alice, bob.boundjid.full, content_add)
                assert caught.value.iq["error"]["condition"] == "feature-not-implemented"

                heard_by_bob = await record(answered, RECORD_SECONDS)
                heard_by_alice = await record(placed, RECORD_SECONDS)
                assert dominant_frequency(heard_by_bob) == pytest.approx(440.0, abs=5)
                assert dominant_frequency(heard_by_alice) == pytest.approx(660.0, abs=5)

                await alice_phone.hangup(placed)
                async with asyncio.timeout(DEADLINE):
                    await answered.ended.wait()
                assert (placed.reason, answered.reason) == ("success", "success")
                assert alice_phone.calls == bob_phone.calls == {}
            finally:
                await alice_phone.close()
                await bob_phone.close()
            assert open_peer_connections() == []
            assert open_transports() == []


async def test_rejected_retracted_and_unknown_sessions(sqlite_url: str, tmp_path: Path) -> None:
    async with running_server(sqlite_url, tmp_path) as server:
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        async with clients(Client(server, alice_jid), Client(server, bob_jid)) as (alice, bob):
            await alice.login()
            await bob.login()
            alice_phone = Softphone(alice, ice_servers=[], timeout=DEADLINE)
            bob_phone = Softphone(bob, ice_servers=[], timeout=DEADLINE)
            try:
                # Bob declines: Alice's call fails with the reason.
                placing = asyncio.create_task(alice_phone.call(bob_jid))
                async with asyncio.timeout(DEADLINE):
                    incoming = await bob_phone.incoming.get()
                bob_phone.reject(incoming)
                with pytest.raises(CallError, match="rejected the call"):
                    await placing

                # Alice gives up before Bob answers: the proposal is retracted.
                alice_phone.timeout = 1
                with pytest.raises(CallError, match="no answer"):
                    await alice_phone.call(bob_jid)
                async with asyncio.timeout(DEADLINE):
                    retracted = await bob_phone.incoming.get()
                    while retracted.withdrawn is None:
                        await asyncio.sleep(0.05)
                assert retracted.withdrawn == "retract"
                with pytest.raises(CallError, match="withdrawn"):
                    await bob_phone.answer(retracted)

                # A Jingle request for a session Bob does not know.
                iq = alice.Iq()
                iq["type"] = "set"
                iq["to"] = bob.boundjid.full
                iq.xml.append(
                    fromstring(
                        f"<jingle xmlns='{NS_JINGLE}' action='session-terminate'"
                        f" sid='nope' initiator='{alice.boundjid.full}'/>"
                    )
                )
                with pytest.raises(IqError) as caught:
                    await iq.send(timeout=DEADLINE)
                assert caught.value.iq["error"]["condition"] == "item-not-found"
            finally:
                await alice_phone.close()
                await bob_phone.close()
            assert alice_phone.calls == bob_phone.calls == {}
            assert open_peer_connections() == []


async def test_call_uses_stun_and_turn_discovered_with_extdisco(
    sqlite_url: str, tmp_path: Path
) -> None:
    def overrides() -> dict[str, dict[str, Any]]:
        port = free_udp_tcp_port()
        stun = {
            "enabled": True,
            "host": ["127.0.0.1"],
            "udp_port": port,
            "tcp_port": port,
            "tls_port": 0,
            "secret": "softphone test secret",
            "relay_host": "127.0.0.1",
            "allowed_peers": ["0.0.0.0/0"],
        }
        return {"stun": stun}

    async with running_server_on_free_ports(sqlite_url, tmp_path, overrides) as server:
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        async with clients(Client(server, alice_jid), Client(server, bob_jid)) as (alice, bob):
            await alice.login()
            await bob.login()
            alice_phone = Softphone(alice, source=lambda: ToneTrack(440.0), timeout=DEADLINE)
            bob_phone = Softphone(bob, source=lambda: ToneTrack(440.0), timeout=DEADLINE)
            try:
                servers = await alice_phone.discover_ice_servers()
                assert {s.urls.partition(":")[0] for s in servers} >= {"stun", "turn"}
                placing = asyncio.create_task(alice_phone.call(bob_jid))
                answered = await bob_phone.answer()
                placed = await placing
                assert "typ relay" in placed.pc.localDescription.sdp
                async with asyncio.timeout(DEADLINE):
                    await alice_phone.wait_connected(placed)
                    await bob_phone.wait_connected(answered)
                heard = await record(answered, RECORD_SECONDS)
                assert dominant_frequency(heard) == pytest.approx(440.0, abs=5)
                await bob_phone.hangup(answered)  # the callee hangs up this time
                async with asyncio.timeout(DEADLINE):
                    await placed.ended.wait()
            finally:
                await alice_phone.close()
                await bob_phone.close()
            assert open_peer_connections() == []
            assert open_transports() == []
