"""Jingle (XEP-0166/0167/0176/0320) ⇄ SDP mapping for aiortc.

Pure functions, no I/O. A Jingle RTP session description (``<jingle>`` with its
``<content>`` elements) becomes the SDP string aiortc's ``RTCSessionDescription``
takes, and aiortc's own offers and answers become Jingle again. Covered: RTP
payload types with ``fmtp`` parameters and ``rtcp-fb`` (XEP-0293), header
extensions (XEP-0294), ``rtcp-mux``, SSRCs and SSRC groups (XEP-0339), BUNDLE
(XEP-0338), ICE-UDP ufrag/pwd/candidates (XEP-0176) and DTLS fingerprints with
their ``setup`` role (XEP-0320).

Jingle ``senders`` names parties (initiator, responder) while SDP directions are
seen from the author of the SDP, so each conversion needs to know who wrote it:
the initiator for an offer (session-initiate), the responder for an answer
(session-accept).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from xmpp_server.stanza import qn
from xmpp_server.xml import Element

NS_JINGLE = "urn:xmpp:jingle:1"
NS_RTP = "urn:xmpp:jingle:apps:rtp:1"
NS_ICE_UDP = "urn:xmpp:jingle:transports:ice-udp:1"
NS_DTLS = "urn:xmpp:jingle:apps:dtls:0"
NS_RTCP_FB = "urn:xmpp:jingle:apps:rtp:rtcp-fb:0"
NS_HDREXT = "urn:xmpp:jingle:apps:rtp:rtp-hdrext:0"
NS_SSMA = "urn:xmpp:jingle:apps:rtp:ssma:0"
NS_GROUPING = "urn:xmpp:jingle:apps:grouping:0"

Role = Literal["initiator", "responder"]
SdpType = Literal["offer", "answer"]

_OTHER: dict[str, Role] = {"initiator": "responder", "responder": "initiator"}
_DTLS_PROTO = "UDP/TLS/RTP/SAVPF"


# -- SDP parsing ---------------------------------------------------------------------


@dataclass
class _Media:
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name]

    def value(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)


@dataclass
class _Sdp:
    attributes: list[tuple[str, str]]
    media: list[_Media]


def _attribute(line: str) -> tuple[str, str]:
    name, _, value = line[2:].partition(":")
    return name, value.strip()


# Transport attributes that may be written once at session level for every m= section.
_INHERITED = ("ice-ufrag", "ice-pwd", "fingerprint", "setup")


def _parse_sdp(sdp: str) -> _Sdp:
    session: list[tuple[str, str]] = []
    media: list[_Media] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        if line.startswith("m="):
            parts = line[2:].split()
            if len(parts) < 3:
                raise ValueError(f"malformed m= line: {line!r}")
            media.append(_Media(parts[0], int(parts[1].split("/")[0]), parts[2], parts[3:]))
        elif line.startswith("a="):
            (media[-1].attributes if media else session).append(_attribute(line))
    for section in media:
        for name in _INHERITED:
            if not section.has(name):
                section.attributes.extend((k, v) for k, v in session if k == name)
    return _Sdp(session, media)


# -- candidates ----------------------------------------------------------------------


def candidate_to_sdp(candidate: Element) -> str:
    """An ICE-UDP ``<candidate>`` as an SDP ``candidate:`` attribute value (RFC 8839)."""
    a = candidate.attrib
    parts = [
        f"candidate:{a['foundation']}",
        a.get("component", "1"),
        a.get("protocol", "udp").lower(),
        a["priority"],
        a["ip"],
        a["port"],
        "typ",
        a.get("type", "host"),
    ]
    if "rel-addr" in a:
        parts += ["raddr", a["rel-addr"]]
    if "rel-port" in a:
        parts += ["rport", a["rel-port"]]
    parts += ["generation", a.get("generation", "0")]
    return " ".join(parts)


def sdp_to_candidate(line: str, *, id: str | None = None) -> Element:
    """An SDP candidate (``a=candidate:…``, ``candidate:…`` or bare) as an ICE-UDP
    ``<candidate>``; without ``id`` a stable one is derived from the candidate itself."""
    value = line.strip().removeprefix("a=").removeprefix("candidate:")
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ValueError(f"malformed ICE candidate: {line!r}")
    attrs = {
        "foundation": bits[0],
        "component": bits[1],
        "protocol": bits[2].lower(),
        "priority": bits[3],
        "ip": bits[4],
        "port": bits[5],
        "type": bits[7],
        "generation": "0",
        "network": "0",
    }
    extra = dict(zip(bits[8::2], bits[9::2], strict=False))
    for sdp_name, jingle_name in (
        ("raddr", "rel-addr"),
        ("rport", "rel-port"),
        ("generation", "generation"),
        ("network-id", "network"),
    ):
        if sdp_name in extra:
            attrs[jingle_name] = extra[sdp_name]
    attrs["id"] = id or hashlib.sha1(" ".join(bits[:8]).encode()).hexdigest()[:10]
    return Element(qn(NS_ICE_UDP, "candidate"), attrs)


# -- Jingle → SDP ----------------------------------------------------------------------


def _direction(senders: str, author: Role) -> str:
    if senders == "both":
        return "sendrecv"
    if senders == "none":
        return "inactive"
    return "sendonly" if senders == author else "recvonly"


def _senders(direction: str, author: Role) -> str:
    return {
        "sendrecv": "both",
        "inactive": "none",
        "sendonly": author,
        "recvonly": _OTHER[author],
    }[direction]


def _fmtp(payload_type: Element) -> str | None:
    params = []
    for param in payload_type.iterfind(qn(NS_RTP, "parameter")):
        name, value = param.get("name", ""), param.get("value", "")
        params.append(f"{name}={value}" if name else value)
    return ";".join(params) if params else None


def _rtcp_fb(pt: str, holder: Element) -> list[str]:
    lines = []
    for fb in holder.iterfind(qn(NS_RTCP_FB, "rtcp-fb")):
        subtype = fb.get("subtype")
        lines.append(f"a=rtcp-fb:{pt} {fb.get('type', '')}" + (f" {subtype}" if subtype else ""))
    for trr in holder.iterfind(qn(NS_RTCP_FB, "rtcp-fb-trr-int")):
        lines.append(f"a=rtcp-fb:{pt} trr-int {trr.get('value', '0')}")
    return lines


def _connection(candidates: list[Element]) -> tuple[str, str]:
    """Port and ``c=`` address of the default candidate (the first RTP one), or the
    placeholder ``9 IN IP4 0.0.0.0`` when there is none yet (trickle ICE)."""
    for cand in candidates:
        if cand.get("component", "1") == "1" and "ip" in cand.attrib:
            ip = cand.attrib["ip"]
            return cand.get("port", "9"), f"IN IP{6 if ':' in ip else 4} {ip}"
    return "9", "IN IP4 0.0.0.0"


def _content_to_sdp(
    content: Element, author: Role, default_setup: str, end_of_candidates: bool
) -> list[str] | None:
    description = content.find(qn(NS_RTP, "description"))
    if description is None:
        return None  # not an RTP content: nothing aiortc could use
    transport = content.find(qn(NS_ICE_UDP, "transport"))
    if transport is None:
        raise ValueError(f"content {content.get('name')!r} has no ICE-UDP transport")
    payload_types = list(description.iterfind(qn(NS_RTP, "payload-type")))
    candidates = list(transport.iterfind(qn(NS_ICE_UDP, "candidate")))
    fingerprints = list(transport.iterfind(qn(NS_DTLS, "fingerprint")))
    port, connection = _connection(candidates)
    ids = " ".join(pt.get("id", "") for pt in payload_types)
    lines = [
        f"m={description.get('media', 'audio')} {port} {_DTLS_PROTO} {ids}".rstrip(),
        f"c={connection}",
        "a=rtcp:9 IN IP4 0.0.0.0",
    ]
    if "ufrag" in transport.attrib:
        lines.append(f"a=ice-ufrag:{transport.attrib['ufrag']}")
    if "pwd" in transport.attrib:
        lines.append(f"a=ice-pwd:{transport.attrib['pwd']}")
    for fp in fingerprints:
        lines.append(f"a=fingerprint:{fp.get('hash', 'sha-256')} {(fp.text or '').strip()}")
    if fingerprints:
        lines.append(f"a=setup:{fingerprints[0].get('setup') or default_setup}")
    lines.append(f"a=mid:{content.get('name', '0')}")
    lines.append(f"a={_direction(content.get('senders', 'both'), author)}")
    if description.find(qn(NS_RTP, "rtcp-mux")) is not None:
        lines.append("a=rtcp-mux")
    if description.find(qn(NS_HDREXT, "extmap-allow-mixed")) is not None:
        lines.append("a=extmap-allow-mixed")
    for ext in description.iterfind(qn(NS_HDREXT, "rtp-hdrext")):
        senders = ext.get("senders", "both")
        suffix = "" if senders == "both" else "/" + _direction(senders, author)
        lines.append(f"a=extmap:{ext.get('id')}{suffix} {ext.get('uri')}")
    ptime = next((pt.get("ptime") for pt in payload_types if pt.get("ptime")), None)
    maxptime = next((pt.get("maxptime") for pt in payload_types if pt.get("maxptime")), None)
    for pt in payload_types:
        pt_id = pt.get("id", "")
        if pt.get("name"):
            rtpmap = f"{pt.get('name')}/{pt.get('clockrate', '8000')}"
            if pt.get("channels") and pt.get("channels") != "1":
                rtpmap += f"/{pt.get('channels')}"
            lines.append(f"a=rtpmap:{pt_id} {rtpmap}")
        fmtp = _fmtp(pt)
        if fmtp:
            lines.append(f"a=fmtp:{pt_id} {fmtp}")
        lines.extend(_rtcp_fb(pt_id, pt))
    lines.extend(_rtcp_fb("*", description))
    if ptime:
        lines.append(f"a=ptime:{ptime}")
    if maxptime:
        lines.append(f"a=maxptime:{maxptime}")
    for group in description.iterfind(qn(NS_SSMA, "ssrc-group")):
        ssrcs = " ".join(s.get("ssrc", "") for s in group.iterfind(qn(NS_SSMA, "source")))
        lines.append(f"a=ssrc-group:{group.get('semantics')} {ssrcs}")
    for source in description.iterfind(qn(NS_SSMA, "source")):
        for param in source.iterfind(qn(NS_SSMA, "parameter")):
            value = param.get("value")
            text = f"{param.get('name')}:{value}" if value is not None else param.get("name")
            lines.append(f"a=ssrc:{source.get('ssrc')} {text}")
    for cand in candidates:
        lines.append("a=" + candidate_to_sdp(cand))
    if end_of_candidates:
        lines.append("a=end-of-candidates")
    return lines


def jingle_to_sdp(jingle: Element, *, role: SdpType, end_of_candidates: bool = False) -> str:
    """The SDP for a ``<jingle>`` session-initiate (``role="offer"``, written by the
    initiator) or session-accept (``role="answer"``, written by the responder).

    Contents without an RTP description are left out. ``end_of_candidates`` adds
    ``a=end-of-candidates``: set it when the peer is known not to trickle more.
    """
    author: Role = "initiator" if role == "offer" else "responder"
    default_setup = "actpass" if role == "offer" else "active"
    session_id = int.from_bytes(hashlib.sha1(jingle.get("sid", "").encode()).digest()[:7])
    lines = [
        "v=0",
        f"o=- {session_id} 2 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
    ]
    for group in jingle.iterfind(qn(NS_GROUPING, "group")):
        names = " ".join(c.get("name", "") for c in group.iterfind(qn(NS_GROUPING, "content")))
        lines.append(f"a=group:{group.get('semantics', 'BUNDLE')} {names}")
    lines.append("a=msid-semantic:WMS *")
    for content in jingle.iterfind(qn(NS_JINGLE, "content")):
        section = _content_to_sdp(content, author, default_setup, end_of_candidates)
        if section is not None:
            lines.extend(section)
    return "\r\n".join(lines) + "\r\n"


# -- SDP → Jingle ----------------------------------------------------------------------


def _payload_types(media: _Media, description: Element) -> None:
    rtpmaps: dict[str, list[str]] = {}
    for value in media.values("rtpmap"):
        map_pt, _, spec = value.partition(" ")
        rtpmaps[map_pt] = spec.split("/")
    fmtps = dict(value.partition(" ")[::2] for value in media.values("fmtp"))
    feedback: dict[str, list[list[str]]] = {}
    for value in media.values("rtcp-fb"):
        fb_pt, *rest = value.split()
        feedback.setdefault(fb_pt, []).append(rest)
    ptime, maxptime = media.value("ptime"), media.value("maxptime")
    for pt in media.formats:
        el = Element(qn(NS_RTP, "payload-type"), {"id": pt})
        codec = rtpmaps.get(pt)
        if codec:
            el.set("name", codec[0])
            if len(codec) > 1:
                el.set("clockrate", codec[1])
            if len(codec) > 2:
                el.set("channels", codec[2])
        if ptime:
            el.set("ptime", ptime)
        if maxptime:
            el.set("maxptime", maxptime)
        for param in filter(None, (p.strip() for p in fmtps.get(pt, "").split(";"))):
            name, sep, value = param.partition("=")
            attrs = {"name": name.strip(), "value": value.strip()} if sep else {"value": name}
            el.append(Element(qn(NS_RTP, "parameter"), attrs))
        _feedback(feedback.get(pt, []), el)
        description.append(el)
    _feedback(feedback.get("*", []), description)


def _feedback(entries: list[list[str]], holder: Element) -> None:
    for entry in entries:
        if not entry:
            continue
        if entry[0] == "trr-int" and len(entry) > 1:
            holder.append(Element(qn(NS_RTCP_FB, "rtcp-fb-trr-int"), {"value": entry[1]}))
            continue
        attrs = {"type": entry[0]}
        if len(entry) > 1:
            attrs["subtype"] = " ".join(entry[1:])
        holder.append(Element(qn(NS_RTCP_FB, "rtcp-fb"), attrs))


def _sources(media: _Media, description: Element) -> None:
    for value in media.values("ssrc-group"):
        semantics, *ssrcs = value.split()
        group = Element(qn(NS_SSMA, "ssrc-group"), {"semantics": semantics})
        for ssrc in ssrcs:
            group.append(Element(qn(NS_SSMA, "source"), {"ssrc": ssrc}))
        description.append(group)
    sources: dict[str, Element] = {}
    for value in media.values("ssrc"):
        ssrc, _, attribute = value.partition(" ")
        if ssrc not in sources:
            sources[ssrc] = Element(qn(NS_SSMA, "source"), {"ssrc": ssrc})
            description.append(sources[ssrc])
        name, sep, param_value = attribute.partition(":")
        attrs = {"name": name, "value": param_value} if sep else {"name": name}
        sources[ssrc].append(Element(qn(NS_SSMA, "parameter"), attrs))


def _description(media: _Media, author: Role) -> Element:
    description = Element(qn(NS_RTP, "description"), {"media": media.kind})
    _payload_types(media, description)
    if media.has("rtcp-mux"):
        description.append(Element(qn(NS_RTP, "rtcp-mux")))
    for value in media.values("extmap"):
        ident, _, uri = value.partition(" ")
        ext_id, _, direction = ident.partition("/")
        attrs = {"id": ext_id, "uri": uri.split()[0] if uri else ""}
        if direction and direction != "sendrecv":
            attrs["senders"] = _senders(direction, author)
        description.append(Element(qn(NS_HDREXT, "rtp-hdrext"), attrs))
    if media.has("extmap-allow-mixed"):
        description.append(Element(qn(NS_HDREXT, "extmap-allow-mixed")))
    _sources(media, description)
    return description


def _transport(media: _Media) -> Element:
    transport = Element(qn(NS_ICE_UDP, "transport"))
    ufrag, pwd = media.value("ice-ufrag"), media.value("ice-pwd")
    if ufrag is not None:
        transport.set("ufrag", ufrag)
    if pwd is not None:
        transport.set("pwd", pwd)
    setup = media.value("setup")
    for value in media.values("fingerprint"):
        hash_name, _, digest = value.partition(" ")
        fp = Element(qn(NS_DTLS, "fingerprint"), {"hash": hash_name.lower()})
        if setup:
            fp.set("setup", setup)
        fp.text = digest.strip()
        transport.append(fp)
    for value in media.values("candidate"):
        transport.append(sdp_to_candidate(value))
    return transport


def sdp_to_jingle(
    sdp: str,
    *,
    action: str,
    sid: str,
    initiator: str,
    responder: str | None = None,
    creator: Role = "initiator",
    author: Role | None = None,
) -> Element:
    """A ``<jingle>`` element for ``action`` carrying the session description ``sdp``.

    ``author`` is the party that wrote the SDP (it orients ``senders``); it defaults
    to the responder for session-accept and content-accept, else the initiator.
    Rejected m= sections (port 0 outside a BUNDLE group) are left out.
    """
    if author is None:
        author = "responder" if action in ("session-accept", "content-accept") else "initiator"
    parsed = _parse_sdp(sdp)
    attrs = {"action": action, "sid": sid, "initiator": initiator}
    if responder is not None:
        attrs["responder"] = responder
    jingle = Element(qn(NS_JINGLE, "jingle"), attrs)
    bundled: set[str] = set()
    for value in (v for k, v in parsed.attributes if k == "group"):
        semantics, *names = value.split()
        if semantics == "BUNDLE":
            bundled.update(names)
        group = Element(qn(NS_GROUPING, "group"), {"semantics": semantics})
        for name in names:
            group.append(Element(qn(NS_GROUPING, "content"), {"name": name}))
        jingle.append(group)
    for index, media in enumerate(parsed.media):
        name = media.value("mid") or str(index)
        if media.port == 0 and name not in bundled and not media.has("bundle-only"):
            continue
        direction = next(
            (d for d in ("sendrecv", "sendonly", "recvonly", "inactive") if media.has(d)),
            "sendrecv",
        )
        content = Element(qn(NS_JINGLE, "content"), {"creator": creator, "name": name})
        senders = _senders(direction, author)
        if senders != "both":
            content.set("senders", senders)
        content.append(_description(media, author))
        content.append(_transport(media))
        jingle.append(content)
    return jingle


def transport_info(
    *,
    sid: str,
    initiator: str,
    content: str,
    creator: Role,
    ufrag: str | None,
    pwd: str | None,
    candidates: list[str],
) -> Element:
    """A transport-info ``<jingle>`` trickling ``candidates`` (SDP candidate lines)."""
    jingle = Element(
        qn(NS_JINGLE, "jingle"), {"action": "transport-info", "sid": sid, "initiator": initiator}
    )
    el = Element(qn(NS_JINGLE, "content"), {"creator": creator, "name": content})
    transport = Element(qn(NS_ICE_UDP, "transport"))
    if ufrag is not None:
        transport.set("ufrag", ufrag)
    if pwd is not None:
        transport.set("pwd", pwd)
    transport.extend(sdp_to_candidate(line) for line in candidates)
    el.append(transport)
    jingle.append(el)
    return jingle
