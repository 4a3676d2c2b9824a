"""Call signalling through a real server: XEP-0353 Jingle Message Initiation messages ring every
device, are copied (carbons), archived (MAM) and queued offline; calls still ringing reach devices
that come online; missed calls leave a record; calls are rate-limited; XEP-0166 iqs pass through.

The JMI messages are built by hand (slixmpp's xep_0353 plugin predates type="chat", ringing and
finish), and every <message/> a client gets is kept as raw XML.
"""

from __future__ import annotations

import asyncio
import copy
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.harness import (
    DOMAIN,
    TIMEOUT,
    Client,
    Mailbox,
    add_user,
    clients,
    next_matching,
    running_server,
)
from tests.e2e.test_mam import mam_query
from xmpp_server.jid import JID
from xmpp_server.modules.jingle import Jingle
from xmpp_server.modules.mam import should_archive
from xmpp_server.server import Server
from xmpp_server.xml import fromstring

NS_JMI = "urn:xmpp:jingle-message:0"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_RTP = "urn:xmpp:jingle:apps:rtp:1"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_MISSED = "urn:natter:missed-call"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
C = "{jabber:client}"

Xml = ET.Element


class CallClient(Client):
    """A client that keeps every <message/> it receives as XML and can send JMI messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_plugin("xep_0280")
        self.register_plugin("xep_0313")
        self.stanzas = Mailbox()
        self.register_handler(
            Callback(
                "every message",
                MatchXPath(f"{C}message"),
                lambda m: self.stanzas.put_nowait(copy.deepcopy(m.xml)),
            )
        )

    async def login_for_calls(self, *, priority: int = 0, carbons: bool = True) -> None:
        await self.login(presence=False)
        if carbons:
            await self.plugin["xep_0280"].enable(timeout=10)
        self.send_presence(ppriority=priority)
        await self.get_roster()
        await self.settle()

    async def settle(self) -> None:
        """A round trip: the server handled everything sent before, we read all it wrote."""
        await self.plugin["xep_0199"].ping(DOMAIN, timeout=10)

    def jmi(self, to: str, tag: str, sid: str, *, mtype: str = "chat") -> None:
        msg = self.make_message(mto=to, mtype=mtype)
        el = ET.SubElement(msg.xml, f"{{{NS_JMI}}}{tag}", {"id": sid})
        if tag == "propose":
            ET.SubElement(el, f"{{{NS_RTP}}}description", {"media": "audio"})
        msg.send()

    async def wait(self, predicate: Callable[[Xml], bool], timeout: float = TIMEOUT) -> Xml:
        return await next_matching(self.stanzas, predicate, timeout)  # type: ignore[no-any-return]

    def count(self, predicate: Callable[[Xml], bool]) -> int:
        return sum(1 for el in self.stanzas.items if predicate(el))


def jmi(tag: str, sid: str) -> Callable[[Xml], bool]:
    """A JMI message itself (not a copy) carrying <tag id=sid/>."""

    def match(el: Xml) -> bool:
        found = el.find(f"{{{NS_JMI}}}{tag}")
        return el.get("type") != "error" and found is not None and found.get("id") == sid

    return match


def carbon(direction: str, tag: str, sid: str) -> Callable[[Xml], bool]:
    inner_match = jmi(tag, sid)

    def match(el: Xml) -> bool:
        inner = el.find(f"{{{NS_CARBONS}}}{direction}/{{{NS_FORWARD}}}forwarded/{C}message")
        return inner is not None and inner_match(inner)

    return match


def missed_call(sid: str) -> Callable[[Xml], bool]:
    def match(el: Xml) -> bool:
        x = el.find(f"{{{NS_MISSED}}}x")
        return x is not None and x.get("sid") == sid

    return match


def error(condition: str) -> Callable[[Xml], bool]:
    def match(el: Xml) -> bool:
        return (
            el.get("type") == "error"
            and el.find(f"{C}error/{{{NS_STANZAS}}}{condition}") is not None
        )

    return match


async def offline_queue_empty(server: Server, user: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while await server.host.storage.offline.fetch(user):
            await asyncio.sleep(0.05)


async def test_server_advertises_call_features(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            info = await alice.plugin["xep_0030"].get_info(DOMAIN)
            features = info["disco_info"]["features"]
            assert {NS_JMI, NS_JINGLE, "urn:xmpp:extdisco:2"} <= set(features)


async def test_propose_rings_everywhere_is_copied_archived_and_answered(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CallClient(server, f"{a}/phone"),
            CallClient(server, f"{a}/laptop"),
            CallClient(server, f"{b}/phone"),
            CallClient(server, f"{b}/desk"),
        ) as (a_phone, a_laptop, b_phone, b_desk):
            await a_phone.login_for_calls()
            await a_laptop.login_for_calls()
            # Different priorities: RFC 6121 would deliver to the phone only.
            await b_phone.login_for_calls(priority=5)
            await b_desk.login_for_calls(priority=1)

            a_phone.jmi(b, "propose", "call-1")
            rung = [await c.wait(jmi("propose", "call-1")) for c in (b_phone, b_desk)]
            for el in rung:
                assert el.get("from") == str(a_phone.boundjid)
                assert el.get("type") == "chat"
                assert el.find("{urn:xmpp:sid:0}stanza-id") is not None
            # The caller's other device sees the call it made.
            await a_laptop.wait(carbon("sent", "propose", "call-1"))
            assert b_phone.count(carbon("received", "propose", "call-1")) == 0

            b_phone.jmi(str(a_phone.boundjid), "ringing", "call-1")
            await a_phone.wait(jmi("ringing", "call-1"))
            # The callee's desk stops ringing: it sees the phone's proceed (a carbon) and the
            # phone's old-style accept to its own bare JID.
            b_phone.jmi(str(a_phone.boundjid), "proceed", "call-1")
            b_phone.jmi(b, "accept", "call-1")
            await a_phone.wait(jmi("proceed", "call-1"))
            await a_laptop.wait(carbon("received", "proceed", "call-1"))
            await b_desk.wait(carbon("sent", "proceed", "call-1"))
            await b_desk.wait(jmi("accept", "call-1"))

            # Answered: a device coming online now does not ring.
            async with clients(CallClient(server, f"{b}/tablet")) as (b_tablet,):
                await b_tablet.login_for_calls()
                await b_phone.settle()
                await b_tablet.settle()
                assert b_tablet.count(jmi("propose", "call-1")) == 0

            a_phone.jmi(str(b_phone.boundjid), "finish", "call-1")
            await b_phone.wait(jmi("finish", "call-1"))

            # Both archives hold the signalling, though none of it has a body.
            for client, peer in ((b_phone, a), (a_laptop, b)):
                answer = await mam_query(client, fields={"with": peer})
                tags = [
                    child.tag.partition("}")[2]
                    for r in answer.results
                    for child in r["mam_result"]["forwarded"]["stanza"].xml
                    if child.tag.startswith(f"{{{NS_JMI}}}")
                ]
                assert tags == ["propose", "ringing", "proceed", "finish"], client.boundjid
            await a_phone.settle()
            assert b_phone.count(missed_call("call-1")) == 0


async def test_device_coming_online_while_ringing_gets_the_propose(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(CallClient(server, f"{a}/phone"), CallClient(server, f"{b}/phone")) as (
            alice,
            b_phone,
        ):
            await alice.login_for_calls()
            await b_phone.login_for_calls()
            alice.jmi(b, "propose", "call-2")
            await b_phone.wait(jmi("propose", "call-2"))
            async with clients(CallClient(server, f"{b}/desk"), CallClient(server, f"{b}/bot")) as (
                b_desk,
                b_bot,
            ):
                await b_desk.login_for_calls()
                late = await b_desk.wait(jmi("propose", "call-2"))
                assert late.get("from") == str(alice.boundjid)
                assert late.find("{urn:xmpp:delay}delay") is not None
                # A negative priority asks for no messages to the bare JID: no ringing.
                await b_bot.login_for_calls(priority=-1, carbons=False)
                await b_bot.settle()
                assert b_bot.count(jmi("propose", "call-2")) == 0

                # The caller gives up: every device of the callee learns it and keeps a record.
                alice.jmi(b, "retract", "call-2")
                for device in (b_phone, b_desk):
                    await device.wait(jmi("retract", "call-2"))
                    record = await device.wait(missed_call("call-2"))
                    assert record.get("from") == DOMAIN
                    assert record.get("type") == "chat"
                    assert record.findtext(f"{C}body", "").startswith(f"Missed call from {a} at ")
                    x = record.find(f"{{{NS_MISSED}}}x")
                    assert x is not None
                    assert (x.get("from"), x.get("reason")) == (a, "retract")
            assert not server.host.modules["jingle"].pending  # type: ignore[attr-defined]


async def test_call_to_an_offline_user_is_queued_and_recorded_as_missed(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        module = server.host.modules["jingle"]
        assert isinstance(module, Jingle)
        woken: list[tuple[JID, str | None]] = []

        async def push(user: JID, propose: ET.Element) -> None:
            woken.append((user, propose.find(f"{{{NS_JMI}}}propose").get("id")))  # type: ignore[union-attr]

        module.add_offline_call_hook(push)
        async with clients(CallClient(server, f"{a}/phone")) as (alice,):
            await alice.login_for_calls()
            alice.jmi(b, "propose", "call-3")
            await alice.settle()
            assert woken == [(JID.parse(b), "call-3")]

            # Comes online while it rings: the propose once, from the offline queue.
            async with clients(CallClient(server, f"{b}/phone")) as (b_phone,):
                await b_phone.login_for_calls()
                got = await b_phone.wait(jmi("propose", "call-3"))
                assert got.find("{urn:xmpp:delay}delay") is not None
                await b_phone.settle()
                assert b_phone.count(jmi("propose", "call-3")) == 1
                # Once the queue gave it away, a second device gets it from the ringing call.
                await offline_queue_empty(server, b)
                async with clients(CallClient(server, f"{b}/desk")) as (b_desk,):
                    await b_desk.login_for_calls()
                    await b_desk.wait(jmi("propose", "call-3"))
                    await b_desk.settle()
                    assert b_desk.count(jmi("propose", "call-3")) == 1
            await offline_queue_empty(server, b)

            # Offline throughout: propose, retract and the record wait in the queue, in order.
            alice.jmi(b, "propose", "call-4")
            alice.jmi(b, "retract", "call-4")
            await alice.settle()
            async with clients(CallClient(server, f"{b}/phone")) as (b_phone,):
                await b_phone.login_for_calls()
                record = await b_phone.wait(missed_call("call-4"))
                items = b_phone.stanzas.items
                order = [
                    next(i for i, el in enumerate(items) if match(el))
                    for match in (jmi("propose", "call-4"), jmi("retract", "call-4"))
                ]
                assert order == sorted(order)
                assert order[-1] < items.index(record)
                answer = await mam_query(b_phone, fields={"with": DOMAIN})
                assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in answer.results] == [
                    record.findtext(f"{C}body")
                ]


async def test_unanswered_call_times_out_and_a_rejected_one_is_not_missed(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"jingle": {"ring_timeout": 1.0}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(
            CallClient(server, f"{a}/phone"),
            CallClient(server, f"{a}/laptop"),
            CallClient(server, f"{b}/phone"),
        ) as (a_phone, a_laptop, b_phone):
            for client in (a_phone, a_laptop, b_phone):
                await client.login_for_calls()

            a_phone.jmi(b, "propose", "declined")
            await b_phone.wait(jmi("propose", "declined"))
            b_phone.jmi(a, "reject", "declined")  # to the caller's bare JID: all its devices
            await a_phone.wait(jmi("reject", "declined"))
            await a_laptop.wait(jmi("reject", "declined"))

            a_phone.jmi(b, "propose", "unanswered")
            await b_phone.wait(jmi("propose", "unanswered"))
            record = await b_phone.wait(missed_call("unanswered"))
            x = record.find(f"{{{NS_MISSED}}}x")
            assert x is not None and x.get("reason") == "timeout"

            # No longer ringing: a device coming online now does not get it.
            async with clients(CallClient(server, f"{b}/desk")) as (b_desk,):
                await b_desk.login_for_calls()
                await b_desk.settle()
                assert b_desk.count(jmi("propose", "unanswered")) == 0
            await asyncio.sleep(1.5)  # past the first call's ring_timeout too
            await b_phone.settle()
            assert b_phone.count(missed_call("declined")) == 0


async def test_calls_are_rate_limited_per_caller(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"jingle": {"max_calls_per_minute": 2}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b, c = [await add_user(server, name) for name in ("alice", "bob", "carol")]
        async with clients(
            CallClient(server, f"{a}/phone"),
            CallClient(server, f"{b}/phone"),
            CallClient(server, f"{c}/phone"),
        ) as (alice, bob, carol):
            for client in (alice, bob, carol):
                await client.login_for_calls()
            for sid in ("r1", "r2"):
                alice.jmi(b, "propose", sid)
                await bob.wait(jmi("propose", sid))
            alice.jmi(b, "propose", "r3")
            bounced = await alice.wait(error("resource-constraint"))
            assert bounced.find(f"{C}error").get("type") == "wait"  # type: ignore[union-attr]
            assert bounced.find(f"{{{NS_JMI}}}propose").get("id") == "r3"  # type: ignore[union-attr]
            # The rest of the conversation still flows, and other callers are not limited.
            alice.jmi(b, "retract", "r2")
            await bob.wait(jmi("retract", "r2"))
            carol.jmi(b, "propose", "c1")
            await bob.wait(jmi("propose", "c1"))
            await bob.settle()
            assert bob.count(jmi("propose", "r3")) == 0


def shape(el: ET.Element) -> Any:
    """An element's tags, attributes, text and children, whatever its prefixes."""
    return (
        el.tag,
        sorted(el.attrib.items()),
        (el.text or "").strip(),
        [shape(child) for child in el],
    )


async def test_jingle_iqs_pass_between_full_jids(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(CallClient(server, f"{a}/phone"), CallClient(server, f"{b}/phone")) as (
            alice,
            bob,
        ):
            await alice.login_for_calls()
            await bob.login_for_calls()
            received: list[ET.Element] = []

            def on_jingle(iq: Any) -> None:
                received.append(copy.deepcopy(iq.xml))
                iq.reply().send()

            bob.register_handler(
                Callback("jingle", MatchXPath(f"{C}iq/{{{NS_JINGLE}}}jingle"), on_jingle)
            )

            def jingle_iq(to: str, action: str) -> Any:
                iq = alice.make_iq_set(ito=to)
                jingle = ET.SubElement(
                    iq.xml,
                    f"{{{NS_JINGLE}}}jingle",
                    {"action": action, "sid": "j1", "initiator": str(alice.boundjid)},
                )
                if action == "session-initiate":
                    content = ET.SubElement(
                        jingle, f"{{{NS_JINGLE}}}content", {"creator": "initiator", "name": "a"}
                    )
                    desc = ET.SubElement(content, f"{{{NS_RTP}}}description", {"media": "audio"})
                    ET.SubElement(
                        desc,
                        f"{{{NS_RTP}}}payload-type",
                        {"id": "111", "name": "opus", "clockrate": "48000", "channels": "2"},
                    )
                    ET.SubElement(
                        content,
                        "{urn:xmpp:jingle:transports:ice-udp:1}transport",
                        {"ufrag": "8hhy", "pwd": "asd88fgpdd777uzjYhagZg"},
                    )
                else:
                    reason = ET.SubElement(jingle, f"{{{NS_JINGLE}}}reason")
                    ET.SubElement(reason, f"{{{NS_JINGLE}}}success")
                return iq

            for action in ("session-initiate", "session-terminate"):
                iq = jingle_iq(str(bob.boundjid), action)
                sent = copy.deepcopy(iq.xml.find(f"{{{NS_JINGLE}}}jingle"))
                result = await iq.send(timeout=TIMEOUT)
                assert result["type"] == "result"
                assert result["from"] == bob.boundjid
                got = received[-1]
                assert got.get("from") == str(alice.boundjid)
                assert shape(got.find(f"{{{NS_JINGLE}}}jingle")) == shape(sent)  # type: ignore[arg-type]

            # RFC 6121 §8.5.3.2.1: no such resource.
            with pytest.raises(IqError) as caught:
                await jingle_iq(f"{b}/gone", "session-initiate").send(timeout=TIMEOUT)
            assert caught.value.iq["error"]["condition"] == "service-unavailable"
            assert len(received) == 2


@pytest.mark.parametrize(
    "tag", ["propose", "ringing", "proceed", "accept", "reject", "retract", "finish"]
)
def test_bodiless_call_signalling_is_archived(tag: str) -> None:
    xml = f"<message xmlns='jabber:client' type='chat'><{tag} xmlns='{NS_JMI}' id='s'/></message>"
    assert should_archive(fromstring(xml))
