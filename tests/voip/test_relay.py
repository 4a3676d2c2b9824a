"""Calls anchored in natterd's relay (``[modules.jingle] media = "relay"``): two softphones
on loopback, each talking only to the server's aiortc legs; tones detected by FFT both ways;
every leg, socket and task gone after hang-up; OMEMO-protected sessions left direct."""

from __future__ import annotations

import asyncio
import fractions
import logging
import random
import re
import resource
import shutil
import threading
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import (
    Client,
    add_user,
    clients,
    free_udp_tcp_port,
    running_server,
    running_server_on_free_ports,
)
from tests.voip.test_softphone import open_peer_connections, open_transports, record
from voip.jingle import NS_DTLS, NS_ICE_UDP, NS_JINGLE, NS_RTP, sdp_to_jingle
from voip.relay import Anchor, Relay, RelayCall, end_to_end_protected, parse_port_range
from voip.softphone import Recorder, Softphone, ToneTrack, dominant_frequency
from xmpp_server.xml import fromstring

DEADLINE = 25.0
RECORD_SECONDS = 1.0
RELAY = {"modules": {"jingle": {"media": "relay"}}}


def relay_settings(forward: str) -> dict[str, Any]:
    return {"modules": {"jingle": {"media": "relay", "relay_forward": forward}}}


@pytest.fixture
def sqlite_url(sqlite_migrated: Path, tmp_path: Path) -> str:
    path = tmp_path / "natter.db"
    shutil.copyfile(sqlite_migrated, path)
    return f"sqlite+aiosqlite:///{path}"


def candidate_ports(sdp: str) -> set[int]:
    """The ports of the a=candidate lines of an SDP."""
    return {int(m.group(1)) for m in re.finditer(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+)", sdp)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def initiate_with_omemo_fingerprint(sid: str, initiator: str, ns: str) -> Any:
    return fromstring(
        f"<jingle xmlns='{NS_JINGLE}' action='session-initiate' sid='{sid}'"
        f" initiator='{initiator}'>"
        "<content creator='initiator' name='0'>"
        f"<description xmlns='{NS_RTP}' media='audio'>"
        "<payload-type id='111' name='opus' clockrate='48000' channels='2'/></description>"
        f"<transport xmlns='{NS_ICE_UDP}' ufrag='abcd' pwd='0123456789abcdefghijkl'>"
        f"<encrypted xmlns='{ns}'><header sid='1'><key rid='2'>a2V5</key><iv>aXY=</iv>"
        "</header><payload>ZmluZ2VycHJpbnQ=</payload></encrypted>"
        "<candidate component='1' foundation='1' generation='0' id='c1' ip='192.0.2.1'"
        " network='0' port='40000' priority='1' protocol='udp' type='host'/>"
        "</transport></content></jingle>"
    )


def test_omemo_fingerprints_are_detected() -> None:
    for ns in ("eu.siacs.conversations.axolotl", "urn:xmpp:omemo:2"):
        assert "OMEMO" in (
            end_to_end_protected(initiate_with_omemo_fingerprint("s", "a", ns)) or ""
        )
    plain = fromstring(
        f"<jingle xmlns='{NS_JINGLE}' action='session-initiate' sid='s'>"
        f"<content creator='initiator' name='0'><transport xmlns='{NS_ICE_UDP}'>"
        f"<fingerprint xmlns='{NS_DTLS}' hash='sha-256' setup='actpass'>AB:CD</fingerprint>"
        "</transport></content></jingle>"
    )
    assert end_to_end_protected(plain) is None


@pytest.mark.parametrize("forward", ["transcode", "passthrough"])
async def test_two_softphones_talk_through_the_relay(
    sqlite_url: str, tmp_path: Path, forward: str
) -> None:
    async with running_server(sqlite_url, tmp_path, relay_settings(forward)) as server:
        anchor: Anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        relay: Relay = anchor.relay
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
                answered = await bob_phone.answer(incoming)
                placed = await placing
                # Both see an ordinary call with each other.
                assert placed.peer == bob.boundjid.full
                assert answered.peer == answered.initiator == alice.boundjid.full
                async with asyncio.timeout(DEADLINE):
                    await alice_phone.wait_connected(placed)
                    await bob_phone.wait_connected(answered)

                # ... but each talks only to the relay's leg.
                [call] = relay.calls.values()
                assert (call.caller, call.callee) == (alice.boundjid.full, bob.boundjid.full)
                alice_leg, bob_leg = call.legs
                for phone_call, leg, other in (
                    (placed, alice_leg, answered),
                    (answered, bob_leg, placed),
                ):
                    remote = candidate_ports(phone_call.pc.remoteDescription.sdp)
                    assert remote
                    assert remote <= candidate_ports(leg.pc.localDescription.sdp)
                    assert not remote & candidate_ports(other.pc.localDescription.sdp)
                    # RTP and RTCP multiplexed on one UDP socket per leg, one ICE component.
                    assert "a=rtcp-mux" in leg.pc.localDescription.sdp
                    [connection] = leg.ice_connections()
                    assert {c.component for c in connection.local_candidates} == {1}
                    assert len(leg.udp_sockets()) == 1
                    pair = connection._nominated.get(1)
                    assert pair is not None
                    assert pair.protocol.transport.get_extra_info("socket") is leg.udp_sockets()[0]

                cpu_before = cpu_seconds()
                heard_by_bob = await record(answered, RECORD_SECONDS)
                heard_by_alice = await record(placed, RECORD_SECONDS)
                assert dominant_frequency(heard_by_bob) == pytest.approx(440.0, abs=5)
                assert dominant_frequency(heard_by_alice) == pytest.approx(660.0, abs=5)
                logging.getLogger(__name__).warning(
                    "%s: process CPU while relaying (softphones included): %.2f s",
                    forward,
                    cpu_seconds() - cpu_before,
                )

                await alice_phone.hangup(placed)
                async with asyncio.timeout(DEADLINE):
                    await answered.ended.wait()
                    await call.ended.wait()
                assert (placed.reason, answered.reason) == ("success", "success")
                record_ = call.record
                assert record_["reason"] == "success"
                for name in ("caller", "callee"):
                    leg_stats = record_["legs"][name]
                    assert leg_stats["packets_received"] > 0
                    assert leg_stats["frames_forwarded"] > 0
                    assert {"packets_lost", "jitter"} <= leg_stats.keys()
                assert relay.passthrough == (forward == "passthrough")
                assert relay.calls == {} and anchor.sessions == {}
                # The call's RTCP figures are in the metrics natterctl stats prints.
                stats = (await server._stats({}))["stats"]["relay"]
                assert stats["active_calls"] == 0 and stats["calls_ended"] == 1
                assert stats["packets_received"] >= sum(
                    record_["legs"][name]["packets_received"] for name in ("caller", "callee")
                )
                assert stats["packets_received"] > 0 and stats["recent_mean_jitter"] is not None
                assert alice_phone.calls == bob_phone.calls == {}
                for leg in call.legs:
                    assert leg.pc.connectionState == "closed"
                    assert all(s.fileno() == -1 for s in leg.udp_sockets())
                async with asyncio.timeout(DEADLINE):
                    while relay.tasks or anchor.tasks:
                        await asyncio.sleep(0.05)
            finally:
                await alice_phone.close()
                await bob_phone.close()
            assert open_peer_connections() == []
            assert open_transports() == []
            # The receivers' decoder threads (tapped ones included) are gone too.
            assert [t for t in threading.enumerate() if t.name.endswith("-decoder")] == []


async def test_omemo_protected_call_is_not_anchored(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="natterd.relay")
    async with running_server(sqlite_url, tmp_path, RELAY) as server:
        anchor: Anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        async with clients(Client(server, alice_jid), Client(server, bob_jid)) as (alice, bob):
            await alice.login()
            await bob.login()
            bob_phone = Softphone(bob, ice_servers=[], timeout=DEADLINE)
            try:
                iq = alice.Iq()
                iq["type"] = "set"
                iq["to"] = bob.boundjid.full
                iq.xml.append(
                    initiate_with_omemo_fingerprint(
                        "omemo1", alice.boundjid.full, "eu.siacs.conversations.axolotl"
                    )
                )
                # Bob's softphone did not expect it and says so: the iq reached Bob untouched.
                with pytest.raises(IqError) as caught:
                    await iq.send(timeout=DEADLINE)
                assert caught.value.iq["from"] == bob.boundjid.full
                assert caught.value.iq["error"]["condition"] == "item-not-found"
                assert anchor.sessions == {} and anchor.relay.calls == {}
                assert "not anchored: OMEMO-encrypted DTLS fingerprint" in caplog.text
            finally:
                await bob_phone.close()


class SilentTrack(MediaStreamTrack):
    """An audio track that never produces a frame (a muted, stalled client)."""

    kind = "audio"

    async def recv(self) -> Any:
        await asyncio.Event().wait()


async def test_relay_ends_a_call_without_media_and_cleans_up() -> None:
    ended: list[str] = []

    async def on_end(call: Any, reason: str) -> None:
        ended.append(reason)

    relay = Relay(media_timeout=1.0, check_interval=0.1, on_end=on_end)
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTrack(SilentTrack())
        callee.addTrack(SilentTrack())
        await caller.setLocalDescription(await caller.createOffer())
        call, offer = await relay.open("s1", "a@x/1", "b@x/1", caller.localDescription.sdp)
        await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await callee.setLocalDescription(await callee.createAnswer())
        answer = await relay.accept(call, callee.localDescription.sdp)
        await caller.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with asyncio.timeout(DEADLINE):
            await call.ended.wait()
            while relay.tasks:
                await asyncio.sleep(0.05)
        assert ended == ["timeout"] and call.record["reason"] == "timeout"
        assert relay.calls == {} and relay.records[-1] is call.record
        assert all(leg.pc.connectionState == "closed" for leg in call.legs)
        assert all(s.fileno() == -1 for leg in call.legs for s in leg.udp_sockets())
    finally:
        await caller.close()
        await callee.close()
        await relay.close()


async def test_unanswered_anchored_session_times_out(sqlite_url: str, tmp_path: Path) -> None:
    settings = {"modules": {"jingle": {"media": "relay", "ring_timeout": 1.0}}}
    async with running_server(sqlite_url, tmp_path, settings) as server:
        anchor: Anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        alice_jid = await add_user(server, "alice")
        bob_jid = await add_user(server, "bob")
        async with clients(Client(server, alice_jid), Client(server, bob_jid)) as (alice, bob):
            await alice.login()
            await bob.login()
            got: dict[str, list[Any]] = {"alice": [], "bob": []}

            def acker(name: str) -> Any:
                def handle(iq: Any) -> None:
                    got[name].append(iq.xml.find(f"{{{NS_JINGLE}}}jingle"))
                    iq.reply().send()

                return handle

            for name, client in (("alice", alice), ("bob", bob)):
                client.register_handler(
                    Callback(
                        f"jingle-{name}",
                        MatchXPath(f"{{jabber:client}}iq/{{{NS_JINGLE}}}jingle"),
                        acker(name),
                    )
                )
            pc = RTCPeerConnection()
            try:
                pc.addTrack(ToneTrack(440.0))
                await pc.setLocalDescription(await pc.createOffer())
                initiate = sdp_to_jingle(
                    pc.localDescription.sdp,
                    action="session-initiate",
                    sid="ring1",
                    initiator=alice.boundjid.full,
                )
                iq = alice.Iq()
                iq["type"] = "set"
                iq["to"] = bob.boundjid.full
                iq.xml.append(initiate)
                await iq.send(timeout=DEADLINE)  # acknowledged by the server
                async with asyncio.timeout(DEADLINE):
                    while not (got["alice"] and len(got["bob"]) >= 2):
                        await asyncio.sleep(0.05)
                # Bob got the relay's session (from Alice's JID) and then its end; so did Alice.
                assert [j.get("action") for j in got["bob"]] == [
                    "session-initiate",
                    "session-terminate",
                ]
                [terminate] = got["alice"]
                assert terminate.get("action") == "session-terminate"
                assert terminate.find(f"{{{NS_JINGLE}}}reason/{{{NS_JINGLE}}}timeout") is not None
                assert anchor.sessions == {} and anchor.relay.calls == {}
                [record_] = anchor.relay.records
                assert record_["reason"] == "timeout"
            finally:
                await pc.close()
            assert open_peer_connections() == []


def test_port_ranges_are_parsed_strictly() -> None:
    assert parse_port_range("") is None
    assert parse_port_range("50000-50009") == (50000, 50009)
    for bad in ("50000", "50009-50000", "80-90", "a-b", "50000-70000"):
        with pytest.raises(ValueError, match="min-max"):
            parse_port_range(bad)


async def relayed_pair(
    relay: Relay, sid: str = "s1", tones: tuple[float, float] = (440.0, 660.0)
) -> tuple[RelayCall, RTCPeerConnection, RTCPeerConnection]:
    """Two plain aiortc peers on this machine calling each other through ``relay``."""
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    caller.addTrack(ToneTrack(tones[0]))
    callee.addTrack(ToneTrack(tones[1]))
    await caller.setLocalDescription(await caller.createOffer())
    call, offer = await relay.open(sid, f"a@x/{sid}", f"b@x/{sid}", caller.localDescription.sdp)
    await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    await callee.setLocalDescription(await callee.createAnswer())
    answer = await relay.accept(call, callee.localDescription.sdp)
    await caller.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return call, caller, callee


def candidate_hosts(sdp: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+", sdp)}


async def test_relay_legs_bind_inside_the_port_range_and_connect() -> None:
    first = 42000 + random.randrange(0, 2000, 20)
    relay = Relay(port_range=(first, first + 19), public_address="127.0.0.1")
    call, caller, callee = await relayed_pair(relay)
    try:
        async with asyncio.timeout(DEADLINE):
            while {caller.connectionState, callee.connectionState} != {"connected"}:
                await asyncio.sleep(0.05)
            while not all(leg.outgoing.frames for leg in call.legs):
                await asyncio.sleep(0.05)
        for leg, peer in ((call.caller_leg, caller), (call.callee_leg, callee)):
            # One socket per leg, on the public address (one of this machine's), in the range.
            [sock] = leg.udp_sockets()
            host, port = sock.getsockname()
            assert host == "127.0.0.1" and first <= port <= first + 19
            assert candidate_ports(peer.remoteDescription.sdp) == {port}
            assert candidate_hosts(peer.remoteDescription.sdp) == {"127.0.0.1"}
            [connection] = leg.ice_connections()
            assert connection._nominated[1].protocol.transport.get_extra_info("socket") is sock
    finally:
        await relay.close()
        await caller.close()
        await callee.close()
    assert all(s.fileno() == -1 for leg in call.legs for s in leg.udp_sockets())


async def test_relay_behind_1to1_nat_offers_its_public_address() -> None:
    """198.51.100.7 is not this machine's: the legs listen on the wildcard address and their
    candidates carry the public one, as a 1:1 NAT in front of the server would map it."""
    first = 44000 + random.randrange(0, 2000, 20)
    relay = Relay(port_range=(first, first + 19), public_address="198.51.100.7")
    call, caller, callee = await relayed_pair(relay)
    try:
        for leg, peer in ((call.caller_leg, caller), (call.callee_leg, callee)):
            assert candidate_hosts(leg.pc.localDescription.sdp) == {"198.51.100.7"}
            assert candidate_hosts(peer.remoteDescription.sdp) == {"198.51.100.7"}
            [sock] = leg.udp_sockets()
            host, port = sock.getsockname()
            assert host == "0.0.0.0" and first <= port <= first + 19
            assert candidate_ports(peer.remoteDescription.sdp) == {port}
    finally:
        await relay.close()
        await caller.close()
        await callee.close()


async def test_relay_port_range_and_public_address_are_configured(
    migrated_db_url: str, tmp_path: Path
) -> None:
    settings = {
        "modules": {
            "jingle": {
                "media": "relay",
                "relay_port_range": "50100-50119",
                "relay_public_address": "198.51.100.7",
            }
        }
    }
    async with running_server(migrated_db_url, tmp_path, settings) as server:
        anchor: Anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        sockets = anchor.relay.host_sockets
        assert sockets is not None
        assert (sockets.port_range, sockets.public_address) == ((50100, 50119), "198.51.100.7")
    async with running_server(migrated_db_url, tmp_path, RELAY) as server:
        anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        assert anchor.relay.host_sockets is None  # aioice's own gathering, as before


async def test_a_full_port_range_fails_the_call_cleanly() -> None:
    """One port for two legs: leg B takes it with the offer, leg A finds none at the answer;
    the call ends (failed-application) and leg B's socket is closed."""
    port = 46000 + random.randrange(0, 2000)
    relay = Relay(port_range=(port, port))
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTrack(ToneTrack(440.0))
        await caller.setLocalDescription(await caller.createOffer())
        call, offer = await relay.open("s1", "a@x/1", "b@x/1", caller.localDescription.sdp)
        assert candidate_ports(offer) == {port}
        await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await callee.setLocalDescription(await callee.createAnswer())
        with pytest.raises(OSError, match=f"no free UDP port in {port}-{port}"):
            await relay.accept(call, callee.localDescription.sdp)
        assert call.record["reason"] == "failed-application" and relay.calls == {}
        assert all(s.fileno() == -1 for leg in call.legs for s in leg.udp_sockets())
    finally:
        await relay.close()
        await caller.close()
        await callee.close()


async def test_every_leg_of_two_calls_shares_one_port() -> None:
    """``shared_port``: four legs, one UDP socket; each call's audio reaches only its peers
    (a crossed demultiplexer would mix the tones up), and the port outlives the calls."""
    port = free_udp_tcp_port()
    relay = Relay(shared_port=port, public_address="127.0.0.1")
    tones = {"s1": (440.0, 660.0), "s2": (880.0, 1100.0)}
    peers: list[RTCPeerConnection] = []
    recorders: dict[tuple[str, int], Recorder] = {}
    calls = {}
    try:
        for sid, pair in tones.items():
            call, caller, callee = await relayed_pair(relay, sid, pair)
            calls[sid] = call
            peers += [caller, callee]
            for index, pc in enumerate((caller, callee)):
                recorder = recorders[(sid, index)] = Recorder()
                for transceiver in pc.getTransceivers():
                    recorder.start(transceiver.receiver.track)
        async with asyncio.timeout(DEADLINE):
            while any(r.seconds < 1.5 for r in recorders.values()):
                await asyncio.sleep(0.1)
        for (sid, index), recorder in recorders.items():
            heard = recorder.samples()[recorder.sample_rate // 2 :]
            # The caller (index 0) hears the callee's tone and the other way round.
            assert dominant_frequency(heard) == pytest.approx(tones[sid][1 - index], abs=5)
        shared = relay.shared
        assert shared is not None and shared.address == ("127.0.0.1", port)
        for call in calls.values():
            for leg in call.legs:
                assert [s.fileno() for s in leg.udp_sockets()] == [shared.socket.fileno()]
                assert candidate_ports(leg.pc.localDescription.sdp) == {port}
        assert shared.legs == 4
        for call in calls.values():
            await relay.hangup(call)
        assert shared.legs == 0 and not shared.demux.by_address
        assert shared.socket.fileno() != -1  # ready for the next calls
    finally:
        for recorder in recorders.values():
            await recorder.stop()
        await relay.close()
        for pc in peers:
            await pc.close()
    assert relay.shared is None


async def test_relay_shared_port_is_configured(sqlite_url: str, tmp_path: Path) -> None:
    def settings() -> dict[str, dict[str, Any]]:
        return {"modules": {"jingle": {"media": "relay", "relay_shared_port": free_udp_tcp_port()}}}

    async with running_server_on_free_ports(sqlite_url, tmp_path, settings) as server:
        anchor: Anchor = server.host.modules["jingle"].anchor  # type: ignore[attr-defined]
        port = server.host.config.modules["jingle"]["relay_shared_port"]
        assert anchor.relay.shared_port == port


class WidebandOpus(MediaStreamTrack):
    """A tone encoded by libopus at 16 kHz (wideband) and handed to aiortc pre-encoded, as a
    client limited to 16 kHz sends it (RTP clock still 48 kHz, RFC 7587)."""

    kind = "audio"

    def __init__(self, frequency: float) -> None:
        super().__init__()
        self.frequency = frequency
        self.codec = av.CodecContext.create("libopus", "w")
        self.codec.sample_rate = 16000
        self.codec.layout = "mono"  # type: ignore[attr-defined]
        self.codec.format = av.AudioFormat("s16")  # type: ignore[attr-defined]
        self.codec.open()  # type: ignore[attr-defined]
        self.count = 0
        self.start: float | None = None
        self.pending: list[Any] = []

    async def recv(self) -> Any:
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time()
        while not self.pending:
            t = np.arange(self.count * 320, (self.count + 1) * 320) / 16000
            samples = (0.3 * 32767 * np.sin(2 * np.pi * self.frequency * t)).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 16000
            frame.pts = self.count * 320
            self.count += 1
            self.pending += self.codec.encode(frame)  # type: ignore[attr-defined]
        packet = self.pending.pop(0)
        index = self.count - len(self.pending) - 1
        delay = self.start + index * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        out = av.Packet(bytes(packet))
        out.pts = index * 960
        out.time_base = fractions.Fraction(1, 48000)
        return out


class TocSpy:
    """Wraps a receiver's decoder queue: notes each Opus packet's bandwidth, then decodes."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.bandwidths: list[str] = []

    def get(self) -> Any:
        return self.original.get()

    def put(self, item: Any) -> None:
        if item is not None:
            config = item[1].data[0] >> 3
            self.bandwidths.append("wb" if 8 <= config <= 11 or 20 <= config <= 23 else "other")
        self.original.put(item)


@pytest.mark.parametrize("forward", ["transcode", "passthrough"])
async def test_opus_at_16_khz_goes_through_the_relay(forward: str) -> None:
    """A 16 kHz Opus stream is forwarded untouched in passthrough (every packet still says
    wideband) and decoded and re-encoded at 48 kHz in transcode; the tone arrives in both."""
    relay = Relay(passthrough=forward == "passthrough")
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    recorder = Recorder()
    spy: TocSpy | None = None

    @callee.on("track")
    def _track(track: MediaStreamTrack) -> None:
        nonlocal spy
        for transceiver in callee.getTransceivers():
            receiver = transceiver.receiver
            if receiver.track is track:
                name = "_RTCRtpReceiver__decoder_queue"
                spy = TocSpy(getattr(receiver, name))
                setattr(receiver, name, spy)
        recorder.start(track)

    try:
        caller.addTrack(WidebandOpus(440.0))
        callee.addTrack(ToneTrack(660.0))
        await caller.setLocalDescription(await caller.createOffer())
        call, offer = await relay.open("wb", "a@x/1", "b@x/1", caller.localDescription.sdp)
        await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await callee.setLocalDescription(await callee.createAnswer())
        answer = await relay.accept(call, callee.localDescription.sdp)
        await caller.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with asyncio.timeout(DEADLINE):
            while recorder.seconds < 1.5:
                await asyncio.sleep(0.1)
        heard = recorder.samples()[recorder.sample_rate // 2 :]
        assert dominant_frequency(heard) == pytest.approx(440.0, abs=5)
        assert spy is not None and len(spy.bandwidths) > 50
        if forward == "passthrough":
            assert set(spy.bandwidths) == {"wb"}
        else:
            assert "other" in spy.bandwidths  # re-encoded from 48 kHz frames
    finally:
        await recorder.stop()
        await relay.close()
        await caller.close()
        await callee.close()
