"""Jingle ⇄ SDP: the XEP examples, round trips, and two aiortc peers negotiating only
through the mapping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack

from voip.jingle import (
    NS_DTLS,
    NS_GROUPING,
    NS_HDREXT,
    NS_ICE_UDP,
    NS_JINGLE,
    NS_RTCP_FB,
    NS_RTP,
    NS_SSMA,
    candidate_to_sdp,
    jingle_to_sdp,
    sdp_to_candidate,
    sdp_to_jingle,
    transport_info,
)
from xmpp_server.stanza import qn
from xmpp_server.xml import Element, fromstring

# XEP-0167 Example 1 with the XEP-0176 candidates and a XEP-0320 fingerprint, as a
# modern client (Conversations, Dino) sends it: Opus with fmtp parameters and
# rtcp-fb, telephone-event, header extensions, rtcp-mux, an SSRC and BUNDLE.
SESSION_INITIATE = """
<iq xmlns='jabber:client' from='romeo@montague.lit/orchard' id='ih28sx61'
    to='juliet@capulet.lit/balcony' type='set'>
  <jingle xmlns='urn:xmpp:jingle:1' action='session-initiate'
      initiator='romeo@montague.lit/orchard' sid='a73sjjvkla37jfea'>
    <group xmlns='urn:xmpp:jingle:apps:grouping:0' semantics='BUNDLE'>
      <content name='voice'/>
    </group>
    <content creator='initiator' name='voice'>
      <description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'>
        <payload-type id='111' name='opus' clockrate='48000' channels='2'>
          <parameter name='minptime' value='10'/>
          <parameter name='useinbandfec' value='1'/>
          <rtcp-fb xmlns='urn:xmpp:jingle:apps:rtp:rtcp-fb:0' type='transport-cc'/>
        </payload-type>
        <payload-type id='0' name='PCMU' clockrate='8000'/>
        <payload-type id='126' name='telephone-event' clockrate='8000'/>
        <rtcp-mux/>
        <rtp-hdrext xmlns='urn:xmpp:jingle:apps:rtp:rtp-hdrext:0' id='1'
            uri='urn:ietf:params:rtp-hdrext:ssrc-audio-level'/>
        <rtp-hdrext xmlns='urn:xmpp:jingle:apps:rtp:rtp-hdrext:0' id='3'
            uri='http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01'/>
        <source xmlns='urn:xmpp:jingle:apps:rtp:ssma:0' ssrc='2815575932'>
          <parameter name='cname' value='Yd9TYgxUKkc8D6yj'/>
          <parameter name='msid' value='my-media-stream my-audio-track'/>
        </source>
      </description>
      <transport xmlns='urn:xmpp:jingle:transports:ice-udp:1'
          pwd='asd88fgpdd777uzjYhagZg' ufrag='8hhy'>
        <fingerprint xmlns='urn:xmpp:jingle:apps:dtls:0' hash='sha-256' setup='actpass'>
          02:1A:CC:54:27:AB:EB:9C:53:3F:3E:4B:65:2E:7D:46:3F:54:42:CD:54:F1:7A:03:A2:7D:F9:B0:7F:46:19:B2
        </fingerprint>
        <candidate component='1' foundation='1' generation='0' id='el0747fg11'
            ip='10.0.1.1' network='1' port='8998' priority='2130706431' protocol='udp'
            type='host'/>
        <candidate component='1' foundation='2' generation='0' id='y3s2b30v3r'
            ip='192.0.2.3' network='1' port='45664' priority='1694498815' protocol='udp'
            rel-addr='10.0.1.1' rel-port='8998' type='srflx'/>
      </transport>
    </content>
  </jingle>
</iq>
"""

# XEP-0176 Example 5: a candidate trickled in transport-info.
TRANSPORT_INFO = """
<jingle xmlns='urn:xmpp:jingle:1' action='transport-info'
    initiator='romeo@montague.lit/orchard' sid='a73sjjvkla37jfea'>
  <content creator='initiator' name='voice'>
    <transport xmlns='urn:xmpp:jingle:transports:ice-udp:1'
        pwd='asd88fgpdd777uzjYhagZg' ufrag='8hhy'>
      <candidate component='1' foundation='3' generation='0' id='3sgi4ofyt3'
          ip='192.0.2.7' network='0' port='53612' priority='16777215' protocol='udp'
          rel-addr='192.0.2.3' rel-port='45664' type='relay'/>
    </transport>
  </content>
</jingle>
"""

FINGERPRINT = (
    "02:1A:CC:54:27:AB:EB:9C:53:3F:3E:4B:65:2E:7D:46:"
    "3F:54:42:CD:54:F1:7A:03:A2:7D:F9:B0:7F:46:19:B2"
)


def jingle_of(iq_text: str) -> Element:
    el = fromstring(iq_text)
    jingle = el if el.tag == qn(NS_JINGLE, "jingle") else el.find(qn(NS_JINGLE, "jingle"))
    assert jingle is not None
    return jingle


def sdp_lines(sdp: str) -> list[str]:
    assert sdp.endswith("\r\n")
    return sdp.split("\r\n")[:-1]


def test_session_initiate_maps_to_an_sdp_offer() -> None:
    lines = sdp_lines(jingle_to_sdp(jingle_of(SESSION_INITIATE), role="offer"))
    assert lines[:4] == ["v=0", lines[1], "s=-", "t=0 0"]
    assert "a=group:BUNDLE voice" in lines
    media = lines[lines.index("m=audio 8998 UDP/TLS/RTP/SAVPF 111 0 126") :]
    expected = [
        "c=IN IP4 10.0.1.1",
        "a=ice-ufrag:8hhy",
        "a=ice-pwd:asd88fgpdd777uzjYhagZg",
        f"a=fingerprint:sha-256 {FINGERPRINT}",
        "a=setup:actpass",
        "a=mid:voice",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtcp-fb:111 transport-cc",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:126 telephone-event/8000",
        "a=ssrc:2815575932 cname:Yd9TYgxUKkc8D6yj",
        "a=ssrc:2815575932 msid:my-media-stream my-audio-track",
        "a=candidate:1 1 udp 2130706431 10.0.1.1 8998 typ host generation 0",
        "a=candidate:2 1 udp 1694498815 192.0.2.3 45664 typ srflx"
        " raddr 10.0.1.1 rport 8998 generation 0",
    ]
    for line in expected:
        assert line in media, line
    # Order within the section follows the element order.
    assert [line for line in media if line in expected] == expected
    assert "a=end-of-candidates" not in lines


def test_end_of_candidates_is_added_on_request() -> None:
    sdp = jingle_to_sdp(jingle_of(SESSION_INITIATE), role="offer", end_of_candidates=True)
    assert sdp.endswith("a=end-of-candidates\r\n")


def test_senders_become_directions_seen_from_the_author() -> None:
    jingle = jingle_of(SESSION_INITIATE)
    content = jingle.find(qn(NS_JINGLE, "content"))
    assert content is not None
    for senders, offer, answer in [
        ("initiator", "sendonly", "recvonly"),
        ("responder", "recvonly", "sendonly"),
        ("none", "inactive", "inactive"),
        ("both", "sendrecv", "sendrecv"),
    ]:
        content.set("senders", senders)
        assert f"a={offer}" in sdp_lines(jingle_to_sdp(jingle, role="offer"))
        assert f"a={answer}" in sdp_lines(jingle_to_sdp(jingle, role="answer"))
        for sdp_type, direction in (("offer", offer), ("answer", answer)):
            action = "session-initiate" if sdp_type == "offer" else "session-accept"
            back = sdp_to_jingle(
                jingle_to_sdp(jingle, role=sdp_type),  # type: ignore[arg-type]
                action=action,
                sid="s",
                initiator="i@x/r",
            )
            again = back.find(qn(NS_JINGLE, "content"))
            assert again is not None
            assert again.get("senders", "both") == senders, (senders, direction)


def test_missing_setup_defaults_by_role() -> None:
    jingle = jingle_of(SESSION_INITIATE)
    fp = jingle.find(f".//{qn(NS_DTLS, 'fingerprint')}")
    assert fp is not None
    del fp.attrib["setup"]
    assert "a=setup:actpass" in jingle_to_sdp(jingle, role="offer")
    assert "a=setup:active" in jingle_to_sdp(jingle, role="answer")


def test_non_rtp_content_is_left_out_and_missing_transport_rejected() -> None:
    jingle = jingle_of(SESSION_INITIATE)
    jingle.append(fromstring("<content xmlns='urn:xmpp:jingle:1' creator='initiator' name='f'/>"))
    assert jingle_to_sdp(jingle, role="offer").count("m=") == 1
    content = jingle.find(qn(NS_JINGLE, "content"))
    assert content is not None
    transport = content.find(qn(NS_ICE_UDP, "transport"))
    assert transport is not None
    content.remove(transport)
    with pytest.raises(ValueError, match="content 'voice' has no ICE-UDP transport"):
        jingle_to_sdp(jingle, role="offer")


def canonical(el: Element) -> tuple[object, ...]:
    """Tag, attributes (minus candidate ids and network), stripped text and children."""
    attrs = dict(el.attrib)
    if el.tag == qn(NS_ICE_UDP, "candidate"):
        attrs.pop("id", None)
        attrs.pop("network", None)
    return (el.tag, sorted(attrs.items()), (el.text or "").strip(), [canonical(c) for c in el])


def test_jingle_to_sdp_to_jingle_keeps_the_description() -> None:
    jingle = jingle_of(SESSION_INITIATE)
    sdp = jingle_to_sdp(jingle, role="offer")
    back = sdp_to_jingle(
        sdp, action="session-initiate", sid="a73sjjvkla37jfea", initiator=jingle.attrib["initiator"]
    )
    assert canonical(back) == canonical(jingle)
    # And once more through SDP: a fixed point.
    assert jingle_to_sdp(back, role="offer") == sdp


def test_sdp_session_level_transport_attributes_are_inherited() -> None:
    sdp = "\r\n".join(
        [
            "v=0",
            "o=- 1 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "a=ice-ufrag:abcd",
            "a=ice-pwd:0123456789abcdefghijkl",
            f"a=fingerprint:SHA-256 {FINGERPRINT}",
            "a=setup:passive",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 101",
            "c=IN IP4 0.0.0.0",
            "a=mid:a",
            "a=recvonly",
            "a=rtpmap:111 opus/48000/2",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-16",
            "a=rtcp-fb:* nack",
            "a=rtcp-fb:111 nack pli",
            "a=rtcp-fb:111 trr-int 100",
            "a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level",
            "a=extmap-allow-mixed",
            "a=ssrc-group:FID 1 2",
            "a=ssrc:1 cname:x",
            "a=ptime:20",
            "m=video 0 UDP/TLS/RTP/SAVPF 96",
            "a=mid:v",
            "",
        ]
    )
    jingle = sdp_to_jingle(
        sdp,
        action="session-accept",
        sid="s",
        initiator="romeo@montague.lit/orchard",
        responder="juliet@capulet.lit/balcony",
    )
    assert jingle.attrib == {
        "action": "session-accept",
        "sid": "s",
        "initiator": "romeo@montague.lit/orchard",
        "responder": "juliet@capulet.lit/balcony",
    }
    (content,) = jingle.iterfind(qn(NS_JINGLE, "content"))  # the rejected video is left out
    assert content.attrib == {"creator": "initiator", "name": "a", "senders": "initiator"}
    transport = content.find(qn(NS_ICE_UDP, "transport"))
    assert transport is not None
    assert transport.attrib == {"ufrag": "abcd", "pwd": "0123456789abcdefghijkl"}
    fp = transport.find(qn(NS_DTLS, "fingerprint"))
    assert fp is not None
    assert (fp.attrib, fp.text) == ({"hash": "sha-256", "setup": "passive"}, FINGERPRINT)
    description = content.find(qn(NS_RTP, "description"))
    assert description is not None
    opus, event = description.iterfind(qn(NS_RTP, "payload-type"))
    assert opus.attrib == {
        "id": "111",
        "name": "opus",
        "clockrate": "48000",
        "channels": "2",
        "ptime": "20",
    }
    assert [fb.attrib for fb in opus.iterfind(qn(NS_RTCP_FB, "rtcp-fb"))] == [
        {"type": "nack", "subtype": "pli"}
    ]
    trr = opus.find(qn(NS_RTCP_FB, "rtcp-fb-trr-int"))
    assert trr is not None and trr.attrib == {"value": "100"}
    assert [p.attrib for p in event.iterfind(qn(NS_RTP, "parameter"))] == [{"value": "0-16"}]
    assert [fb.attrib for fb in description.iterfind(qn(NS_RTCP_FB, "rtcp-fb"))] == [
        {"type": "nack"}
    ]
    ext = description.find(qn(NS_HDREXT, "rtp-hdrext"))
    assert ext is not None
    assert ext.attrib == {
        "id": "2",
        "uri": "urn:ietf:params:rtp-hdrext:csrc-audio-level",
        "senders": "initiator",  # the responder wrote recvonly
    }
    assert description.find(qn(NS_HDREXT, "extmap-allow-mixed")) is not None
    group = description.find(qn(NS_SSMA, "ssrc-group"))
    assert group is not None and group.get("semantics") == "FID"
    assert [s.get("ssrc") for s in group] == ["1", "2"]
    assert jingle.find(qn(NS_GROUPING, "group")) is None
    # Back to SDP: the bare fmtp value, wildcard feedback and directions survive.
    lines = sdp_lines(jingle_to_sdp(jingle, role="answer"))
    for line in [
        "a=fmtp:101 0-16",
        "a=rtcp-fb:* nack",
        "a=rtcp-fb:111 nack pli",
        "a=rtcp-fb:111 trr-int 100",
        "a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level",
        "a=ssrc-group:FID 1 2",
        "a=ptime:20",
        "a=recvonly",
        "a=setup:passive",
    ]:
        assert line in lines, line


def test_trickled_candidate_maps_both_ways() -> None:
    jingle = jingle_of(TRANSPORT_INFO)
    candidate = jingle.find(f".//{qn(NS_ICE_UDP, 'candidate')}")
    assert candidate is not None
    line = candidate_to_sdp(candidate)
    assert line == (
        "candidate:3 1 udp 16777215 192.0.2.7 53612 typ relay"
        " raddr 192.0.2.3 rport 45664 generation 0"
    )
    back = sdp_to_candidate("a=" + line, id="3sgi4ofyt3")
    assert canonical(back) == canonical(candidate)
    assert back.get("id") == "3sgi4ofyt3"
    # Without an id one is derived, stable for the same candidate.
    assert sdp_to_candidate(line).get("id") == sdp_to_candidate(line).get("id")
    info = transport_info(
        sid="a73sjjvkla37jfea",
        initiator="romeo@montague.lit/orchard",
        content="voice",
        creator="initiator",
        ufrag="8hhy",
        pwd="asd88fgpdd777uzjYhagZg",
        candidates=[line],
    )
    assert canonical(info) == canonical(jingle)


def test_malformed_candidate_is_rejected() -> None:
    with pytest.raises(ValueError, match="malformed ICE candidate"):
        sdp_to_candidate("candidate:1 1 udp 5 10.0.0.1 9 host")


# -- aiortc -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[RTCPeerConnection]:
    pc = RTCPeerConnection()
    try:
        yield pc
    finally:
        await pc.close()


async def test_aiortc_accepts_a_xep_offer_and_its_answer_maps_back() -> None:
    async with peer() as callee:
        offer = jingle_to_sdp(jingle_of(SESSION_INITIATE), role="offer")
        await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        callee.addTrack(AudioStreamTrack())
        await callee.setLocalDescription(await callee.createAnswer())
        accept = sdp_to_jingle(
            callee.localDescription.sdp,
            action="session-accept",
            sid="a73sjjvkla37jfea",
            initiator="romeo@montague.lit/orchard",
            responder="juliet@capulet.lit/balcony",
        )
        (content,) = accept.iterfind(qn(NS_JINGLE, "content"))
        assert content.get("name") == "voice"
        (opus,) = [
            pt
            for pt in content.iterfind(f".//{qn(NS_RTP, 'payload-type')}")
            if pt.get("name") == "opus"
        ]
        assert (opus.get("id"), opus.get("clockrate"), opus.get("channels")) == (
            "111",
            "48000",
            "2",
        )
        fp = content.find(f".//{qn(NS_DTLS, 'fingerprint')}")
        assert fp is not None and fp.get("setup") in ("active", "passive")
        assert content.find(f".//{qn(NS_ICE_UDP, 'candidate')}") is not None


async def test_two_aiortc_peers_connect_through_jingle_only() -> None:
    async with peer() as caller, peer() as callee:
        received: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

        @callee.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if not received.done():
                received.set_result(track)

        caller.addTrack(AudioStreamTrack())
        await caller.setLocalDescription(await caller.createOffer())
        initiate = sdp_to_jingle(
            caller.localDescription.sdp,
            action="session-initiate",
            sid="sid1",
            initiator="romeo@montague.lit/orchard",
        )
        await callee.setRemoteDescription(
            RTCSessionDescription(jingle_to_sdp(initiate, role="offer"), "offer")
        )
        callee.addTrack(AudioStreamTrack())
        await callee.setLocalDescription(await callee.createAnswer())
        accept = sdp_to_jingle(
            callee.localDescription.sdp,
            action="session-accept",
            sid="sid1",
            initiator="romeo@montague.lit/orchard",
            responder="juliet@capulet.lit/balcony",
        )
        await caller.setRemoteDescription(
            RTCSessionDescription(jingle_to_sdp(accept, role="answer"), "answer")
        )
        async with asyncio.timeout(20):
            track = await received
            frame = await track.recv()
            while not (
                caller.connectionState == callee.connectionState == "connected"
                and caller.iceConnectionState in ("completed", "connected")
            ):
                await asyncio.sleep(0.05)
        assert track.kind == "audio"
        assert frame.sample_rate == 48000


async def test_video_content_is_carried_alongside_audio() -> None:
    async with peer() as caller, peer() as callee:
        caller.addTrack(AudioStreamTrack())
        caller.addTransceiver("video", direction="recvonly")
        await caller.setLocalDescription(await caller.createOffer())
        initiate = sdp_to_jingle(
            caller.localDescription.sdp, action="session-initiate", sid="v", initiator="a@x/r"
        )
        audio, video = initiate.iterfind(qn(NS_JINGLE, "content"))
        assert video.get("senders") == "responder"  # the initiator only receives video
        media = [c.find(qn(NS_RTP, "description")) for c in (audio, video)]
        assert [d.get("media") for d in media if d is not None] == ["audio", "video"]
        group = initiate.find(qn(NS_GROUPING, "group"))
        assert group is not None
        assert [c.get("name") for c in group] == [audio.get("name"), video.get("name")]
        await callee.setRemoteDescription(
            RTCSessionDescription(jingle_to_sdp(initiate, role="offer"), "offer")
        )
        await callee.setLocalDescription(await callee.createAnswer())
        accept = sdp_to_jingle(
            callee.localDescription.sdp,
            action="session-accept",
            sid="v",
            initiator="a@x/r",
            responder="b@x/r",
        )
        assert len(list(accept.iterfind(qn(NS_JINGLE, "content")))) == 2
        await caller.setRemoteDescription(
            RTCSessionDescription(jingle_to_sdp(accept, role="answer"), "answer")
        )
