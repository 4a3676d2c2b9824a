"""One UDP port for many legs (``voip/sharedport.py``): the routing table on its own, then
real aiortc peer connections: two clients, two server legs on one socket, each server leg
hears its own client's tone and nothing of the other's."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
import pytest
from aioice import stun
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from voip.sharedport import Demux, SharedPort
from voip.softphone import SAMPLE_RATE, Recorder, ToneTrack, dominant_frequency

DEADLINE = 25.0
PASSWORDS = {"leg-a": "a" * 22, "leg-b": "b" * 22}


def check(ufrag: str, password: str, transaction: bytes = b"\x01" * 12) -> bytes:
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=transaction)
    request.attributes["USERNAME"] = f"{ufrag}:client"
    request.add_message_integrity(password.encode())
    return bytes(request)


def test_checks_claim_addresses_for_their_leg() -> None:
    demux = Demux(lambda leg: PASSWORDS[leg])
    demux.add("ua", "leg-a")
    demux.add("ub", "leg-b")
    one, two = ("192.0.2.1", 4000), ("192.0.2.2", 5000)
    assert demux.route(b"\x17\xfe\xfd media", one) is None  # unknown address: dropped
    assert demux.route(check("ua", PASSWORDS["leg-a"]), one) == "leg-a"
    assert demux.route(check("ub", PASSWORDS["leg-b"]), two) == "leg-b"
    assert demux.route(b"\x17\xfe\xfd media", one) == "leg-a"  # learnt
    assert demux.route(b"\x80\x6f srtp", two) == "leg-b"


def test_a_check_must_prove_the_legs_password() -> None:
    demux = Demux(lambda leg: PASSWORDS[leg])
    demux.add("ua", "leg-a")
    address = ("192.0.2.9", 4000)
    assert demux.route(check("ua", "x" * 22), address) is None
    assert demux.route(check("nobody", PASSWORDS["leg-a"]), address) is None
    assert address not in demux.by_address


def test_sends_claim_addresses_and_removal_forgets_them() -> None:
    demux = Demux(lambda leg: PASSWORDS[leg])
    demux.add("ua", "leg-a")
    demux.add("ub", "leg-b")
    client = ("192.0.2.1", 4000)
    demux.learn(client, "leg-a")  # the leg's own check went out first
    demux.learn(client, "leg-b")  # the first claim stands
    assert demux.route(b"\x17 dtls", client) == "leg-a"
    demux.remove("leg-a")
    assert demux.route(b"\x17 dtls", client) is None
    assert "ua" not in demux.by_ufrag
    with pytest.raises(ValueError, match="already in use"):
        demux.add("ub", "leg-c")


def ice_connection(pc: RTCPeerConnection) -> Any:
    transport = pc.getTransceivers()[0].sender.transport
    return transport.transport.iceGatherer._connection


async def server_leg(port: SharedPort, offer: str, recorder: Recorder) -> tuple[Any, str]:
    """An answering peer connection whose ICE runs on the shared port."""
    pc = RTCPeerConnection()

    @pc.on("track")
    def _track(track: MediaStreamTrack) -> None:
        recorder.start(track)

    await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    pc.addTrack(ToneTrack(1000.0, amplitude=0.0))  # the leg sends silence back
    answer = await pc.createAnswer()
    port.attach(ice_connection(pc))
    await pc.setLocalDescription(answer)
    return pc, pc.localDescription.sdp


async def test_two_legs_share_one_socket_and_hear_only_their_client() -> None:
    port = await SharedPort.open("127.0.0.1", 0)
    clients: list[RTCPeerConnection] = []
    servers: list[RTCPeerConnection] = []
    recorders = [Recorder(), Recorder()]
    try:
        for frequency, recorder in zip((440.0, 880.0), recorders, strict=True):
            client = RTCPeerConnection()
            clients.append(client)
            client.addTrack(ToneTrack(frequency))
            await client.setLocalDescription(await client.createOffer())
            server, answer = await server_leg(port, client.localDescription.sdp, recorder)
            servers.append(server)
            assert f" 127.0.0.1 {port.address[1]} typ host" in answer
            await client.setRemoteDescription(RTCSessionDescription(answer, "answer"))

        async with asyncio.timeout(DEADLINE):
            while any(r.seconds < 1.5 for r in recorders):
                await asyncio.sleep(0.1)
        for frequency, recorder in zip((440.0, 880.0), recorders, strict=True):
            samples = recorder.samples()[SAMPLE_RATE // 2 :]
            assert abs(dominant_frequency(samples) - frequency) <= 5
            other = 880.0 if frequency == 440.0 else 440.0
            spectrum = np.abs(np.fft.rfft(samples))
            bins = np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)
            assert spectrum[np.argmin(abs(bins - other))] < spectrum.max() / 100

        # One socket for both legs: everything they sent and got went through it.
        shared = port.socket
        for server in servers:
            sockets = {
                p.transport.get_extra_info("socket").fileno()
                for p in ice_connection(server)._protocols
            }
            assert sockets == {shared.fileno()}
        assert port.legs == 2
        assert len(port.demux.by_address) == 2
    finally:
        for recorder in recorders:
            await recorder.stop()
        for pc in clients + servers:
            await pc.close()
    await asyncio.sleep(0)
    assert port.legs == 0 and not port.demux.by_address
    # The port stays open for the next calls.
    assert port.socket.family == socket.AF_INET and port.transport is not None
    assert not port.transport.is_closing()
    port.close()
