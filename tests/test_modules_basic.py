"""Ping, version, vCard, last activity, blocking and registration, driven through a real
Router and Storage with fake sessions that record what the server sends them."""

from __future__ import annotations

import asyncio
import types
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import xmpp_server
from xmpp_server.config import Config, build_config, parse_options
from xmpp_server.errors import StanzaError, StreamError
from xmpp_server.jid import JID
from xmpp_server.modules import blocking as blocking_module
from xmpp_server.modules import last as last_module
from xmpp_server.modules.base import Module
from xmpp_server.modules.blocking import Blocking, is_blocked
from xmpp_server.modules.last import LastActivity
from xmpp_server.modules.ping import Ping
from xmpp_server.modules.register import Register
from xmpp_server.modules.vcard import VCard, load
from xmpp_server.modules.version import Version
from xmpp_server.router import Router
from xmpp_server.sasl import make_credentials
from xmpp_server.server import entitled
from xmpp_server.stanza import error_condition, error_reply, make, qn
from xmpp_server.storage import RosterItem, Storage
from xmpp_server.xml import Element, tostring

DOMAIN = "localhost"
ALICE = JID.parse("alice@localhost")
BOB = JID.parse("bob@localhost")
CAROL = JID.parse("carol@localhost")
CLIENT = "{jabber:client}"


# -- harness ----------------------------------------------------------------------------


@dataclass(eq=False)
class FakeSession:
    """A bound client: implements the router's Session protocol and records its output."""

    jid: JID
    available: bool = False
    priority: int = 0
    presence: Element | None = None
    interested: bool = False
    directed: set[JID] = field(default_factory=set)
    sent: list[Element] = field(default_factory=list)
    closed: list[StreamError] = field(default_factory=list)

    def deliver(self, stanza: Element) -> None:
        self.sent.append(stanza)

    def terminate(self, error: StreamError) -> None:
        self.closed.append(error)

    def take(self) -> list[Element]:
        out, self.sent = self.sent, []
        return out

    def one(self) -> Element:
        out = self.take()
        assert len(out) == 1, [tostring(el) for el in out]
        return out[0]


@dataclass
class FakeHost:
    config: Config
    storage: Storage
    router: Router
    started_at: float
    modules: dict[str, Module] = field(default_factory=dict)
    known_accounts: None = None

    @property
    def domain(self) -> str:
        return self.config.server.domain


class Server:
    """Just enough of natterd to run this file's modules against a real Router."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.router = host.router
        self.storage = host.storage

    def add(self, cls: type[Module], **options: Any) -> Any:
        options = parse_options(cls.options_class, options, f"modules.{cls.name}")
        module = cls(self.host, options)  # type: ignore[arg-type]  # FakeHost quacks like Host
        self.host.modules[cls.name] = module
        module.setup()
        return module

    async def login(self, full: str, *, available: bool = True) -> FakeSession:
        session = FakeSession(JID.parse(full), available=available)
        if available:
            session.presence = make("presence")
        await self.router.bind(session)
        return session

    async def send(self, session: FakeSession, stanza: Element) -> None:
        await self.router.route(session, stanza)

    async def subscribe(self, contact: JID, user: JID, subscription: str = "from") -> None:
        """``user``'s roster says ``contact`` is subscribed to it."""
        await self.storage.rosters.put(
            str(user), RosterItem(str(contact), subscription=subscription)
        )


@pytest.fixture
async def server(storage: Storage, tmp_path: Path) -> AsyncIterator[Server]:
    config = build_config({"server": {"domain": DOMAIN, "name": "Natter"}}, base_dir=tmp_path)

    async def account_exists(jid: JID) -> bool:
        return await storage.accounts.exists(str(jid.bare))

    router = Router(DOMAIN, account_exists, entitled(storage))
    host = FakeHost(config, storage, router, asyncio.get_running_loop().time())

    # Stand-in for the presence module: presence to a bare JID reaches its available resources.
    async def presence_to_bare(origin: Any, stanza: Element, to: JID) -> bool:
        for session in router.available(to):
            session.deliver(stanza)
        return True

    router.add_hook("presence/bare", presence_to_bare)
    for jid in (ALICE, BOB, CAROL):
        await storage.accounts.create(str(jid), [])
    yield Server(host)


def iq(
    type_: str, child: Element | None = None, to: JID | str | None = None, id_: str = "q1"
) -> Element:
    stanza = make("iq", type=type_, id=id_, to=to)
    if child is not None:
        stanza.append(child)
    return stanza


def el(ns: str, local: str, attrs: dict[str, str] | None = None, *children: Element) -> Element:
    out = Element(qn(ns, local), attrs or {})
    out.extend(children)
    return out


def wire(stanza: Element) -> str:
    return tostring(stanza)


def assert_error(reply: Element, condition: str, type_: str) -> None:
    assert reply.get("type") == "error", wire(reply)
    error = reply.find(f"{CLIENT}error")
    assert error is not None
    assert error.get("type") == type_, wire(reply)
    assert error_condition(reply) == condition, wire(reply)


def error_request(reply: Element) -> list[Element]:
    return [child for child in reply if child.tag != f"{CLIENT}error"]


# -- XEP-0199 ping ----------------------------------------------------------------------

NS_PING = "urn:xmpp:ping"


async def test_ping_server(server: Server) -> None:
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_PING, "ping"), to=DOMAIN))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="localhost"/>'
    )


async def test_ping_own_account_without_to(server: Server) -> None:
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_PING, "ping")))
    assert wire(alice.one()) == '<iq type="result" id="q1" to="alice@localhost/phone"/>'


async def test_ping_account_needs_a_subscription(server: Server) -> None:
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_PING, "ping"), to=BOB))
    reply = alice.one()
    assert reply.get("from") == "bob@localhost"
    assert_error(reply, "service-unavailable", "cancel")

    await server.subscribe(ALICE, BOB, "both")
    await server.send(alice, iq("get", el(NS_PING, "ping"), to=BOB, id_="q2"))
    assert wire(alice.one()) == (
        '<iq type="result" id="q2" to="alice@localhost/phone" from="bob@localhost"/>'
    )


async def test_ping_subscription_the_wrong_way_is_not_enough(server: Server) -> None:
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    await server.subscribe(ALICE, BOB, "to")  # bob sees alice, not the other way round
    await server.send(alice, iq("get", el(NS_PING, "ping"), to=BOB))
    assert_error(alice.one(), "service-unavailable", "cancel")


async def test_ping_unknown_account(server: Server) -> None:
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_PING, "ping"), to="nobody@localhost"))
    assert_error(alice.one(), "service-unavailable", "cancel")


# -- XEP-0092 software version ------------------------------------------------------------

NS_VERSION = "jabber:iq:version"


async def test_version_hides_the_os_by_default(server: Server) -> None:
    server.add(Version)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_VERSION, "query"), to=DOMAIN))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="localhost">'
        '<query xmlns="jabber:iq:version"><name>Natter</name>'
        f"<version>{xmpp_server.__version__}</version></query></iq>"
    )


async def test_version_shows_the_os_when_asked(server: Server) -> None:
    server.add(Version, show_os=True)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_VERSION, "query"), to=DOMAIN))
    query = alice.one().find(qn(NS_VERSION, "query"))
    assert query is not None
    assert [child.tag.rpartition("}")[2] for child in query] == ["name", "version", "os"]
    assert query.findtext(qn(NS_VERSION, "os"))


# -- XEP-0054 vcard-temp --------------------------------------------------------------------

NS_VCARD = "vcard-temp"


def vcard(name: str) -> Element:
    card = el(NS_VCARD, "vCard")
    ET.SubElement(card, qn(NS_VCARD, "FN")).text = name
    photo = ET.SubElement(card, qn(NS_VCARD, "PHOTO"))
    ET.SubElement(photo, qn(NS_VCARD, "TYPE")).text = "image/png"
    ET.SubElement(photo, qn(NS_VCARD, "BINVAL")).text = "iVBORw0KGgo="
    return card


async def test_vcard_own_empty_when_never_set(server: Server) -> None:
    server.add(VCard)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_VCARD, "vCard")))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone"><vCard xmlns="vcard-temp"/></iq>'
    )


async def test_vcard_publish_then_everyone_reads_it(server: Server) -> None:
    server.add(VCard)
    alice = await server.login("alice@localhost/phone")
    bob = await server.login("bob@localhost/pc")
    await server.send(alice, iq("set", vcard("Alice <3"), to=ALICE))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="alice@localhost"/>'
    )
    card = (
        '<vCard xmlns="vcard-temp"><FN>Alice &lt;3</FN>'
        "<PHOTO><TYPE>image/png</TYPE><BINVAL>iVBORw0KGgo=</BINVAL></PHOTO></vCard>"
    )
    assert await server.storage.vcards.get(str(ALICE)) == card

    await server.send(bob, iq("get", el(NS_VCARD, "vCard"), to=ALICE, id_="q2"))
    assert wire(bob.one()) == (
        f'<iq type="result" id="q2" to="bob@localhost/pc" from="alice@localhost">{card}</iq>'
    )
    await server.send(alice, iq("get", el(NS_VCARD, "vCard"), id_="q3"))
    assert wire(alice.one()) == f'<iq type="result" id="q3" to="alice@localhost/phone">{card}</iq>'


async def test_vcard_of_someone_without_one_looks_like_no_account(server: Server) -> None:
    server.add(VCard)
    bob = await server.login("bob@localhost/pc")
    await server.send(bob, iq("get", el(NS_VCARD, "vCard"), to=ALICE))
    reply = bob.one()
    assert reply.get("from") == "alice@localhost"
    # XEP-0054 §3.3: the same answer as for an account that does not exist.
    assert_error(reply, "service-unavailable", "cancel")
    await server.send(bob, iq("get", el(NS_VCARD, "vCard"), to="nobody@localhost"))
    assert_error(bob.one(), "service-unavailable", "cancel")


async def test_vcard_of_someone_else_cannot_be_set(server: Server) -> None:
    server.add(VCard)
    bob = await server.login("bob@localhost/pc")
    await server.send(bob, iq("set", vcard("Not Alice"), to=ALICE))
    assert_error(bob.one(), "service-unavailable", "cancel")  # tells nothing about alice
    assert await server.storage.vcards.get(str(ALICE)) is None


async def test_vcard_too_large(server: Server) -> None:
    server.add(VCard, max_size=100)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", vcard("A" * 100)))
    assert_error(alice.one(), "not-acceptable", "modify")
    assert await server.storage.vcards.get(str(ALICE)) is None


async def test_vcard_empty_publish_deletes(server: Server) -> None:
    server.add(VCard)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", vcard("Alice")))
    await server.send(alice, iq("set", el(NS_VCARD, "vCard"), id_="q2"))
    assert [reply.get("type") for reply in alice.take()] == ["result", "result"]
    assert await server.storage.vcards.get(str(ALICE)) is None


def test_vcard_load_accepts_text_stored_without_xmlns() -> None:
    legacy = load("<vCard><FN>Alice</FN><X xmlns='urn:other'><Y/></X></vCard>")
    assert tostring(legacy, parent_ns="") == (
        '<vCard xmlns="vcard-temp"><FN>Alice</FN><X xmlns="urn:other"><Y/></X></vCard>'
    )


# -- XEP-0012 last activity -------------------------------------------------------------------

NS_LAST = "jabber:iq:last"


async def test_last_server_uptime(server: Server) -> None:
    server.add(LastActivity)
    server.host.started_at = asyncio.get_running_loop().time() - 100.5
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=DOMAIN))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="localhost">'
        '<query xmlns="jabber:iq:last" seconds="100"/></iq>'
    )


async def test_last_refused_without_subscription(server: Server) -> None:
    server.add(LastActivity)
    await server.storage.last_activity.set(str(BOB), 1000.0, "")
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=BOB))
    reply = alice.one()
    assert reply.get("from") == "bob@localhost"
    # Not forbidden: that would tell a stranger bob exists (issue 13, defect 9).
    assert_error(reply, "service-unavailable", "cancel")


async def test_last_seen_with_status(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.add(LastActivity)
    monkeypatch.setattr(last_module, "time", types.SimpleNamespace(time=lambda: 1_000_903.9))
    await server.storage.last_activity.set(str(BOB), 1_000_000.0, "Heading Home")
    await server.subscribe(ALICE, BOB, "from")
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=BOB))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="bob@localhost">'
        '<query xmlns="jabber:iq:last" seconds="903">Heading Home</query></iq>'
    )


async def test_last_zero_while_online(server: Server) -> None:
    server.add(LastActivity)
    await server.storage.last_activity.set(str(BOB), 1_000_000.0, "Heading Home")
    await server.subscribe(ALICE, BOB, "both")
    await server.login("bob@localhost/pc")
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=BOB))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="bob@localhost">'
        '<query xmlns="jabber:iq:last" seconds="0"/></iq>'
    )


async def test_last_bound_but_not_available_is_offline(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add(LastActivity)
    monkeypatch.setattr(last_module, "time", types.SimpleNamespace(time=lambda: 1_000_060.0))
    await server.storage.last_activity.set(str(BOB), 1_000_000.0, "")
    await server.subscribe(ALICE, BOB, "from")
    await server.login("bob@localhost/pc", available=False)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=BOB))
    query = alice.one().find(qn(NS_LAST, "query"))
    assert query is not None and query.get("seconds") == "60" and not query.text


async def test_last_never_logged_in(server: Server) -> None:
    server.add(LastActivity)
    await server.subscribe(ALICE, BOB, "from")
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query"), to=BOB))
    assert_error(alice.one(), "item-not-found", "cancel")


async def test_last_own_account(server: Server) -> None:
    server.add(LastActivity)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_LAST, "query")))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone">'
        '<query xmlns="jabber:iq:last" seconds="0"/></iq>'
    )


# -- XEP-0191 blocking --------------------------------------------------------------------------

NS_BLOCK = "urn:xmpp:blocking"


def block(tag: str, *jids: str) -> Element:
    return el(NS_BLOCK, tag, None, *(el(NS_BLOCK, "item", {"jid": jid}) for jid in jids))


def chat(to: JID | str, body: str = "hi") -> Element:
    message = make("message", to=to, type="chat", id="m1")
    ET.SubElement(message, f"{CLIENT}body").text = body
    return message


def test_blocklist_matching() -> None:
    items = frozenset(
        JID.parse(j)
        for j in ("bob@localhost", "carol@localhost/work", "spam.example", "gw.test/bot")
    )
    assert is_blocked(items, JID.parse("bob@localhost"))
    assert is_blocked(items, JID.parse("bob@localhost/any"))
    assert is_blocked(items, JID.parse("carol@localhost/work"))
    assert not is_blocked(items, JID.parse("carol@localhost"))
    assert not is_blocked(items, JID.parse("carol@localhost/home"))
    assert is_blocked(items, JID.parse("spam.example"))
    assert is_blocked(items, JID.parse("x@spam.example/r"))
    assert is_blocked(items, JID.parse("x@muc.spam.example"))
    assert is_blocked(items, JID.parse("gw.test/bot"))
    assert not is_blocked(items, JID.parse("gw.test"))
    assert not is_blocked(items, JID.parse("user@gw.test/bot"))
    assert not is_blocked(items, JID.parse("alice@localhost"))
    assert not is_blocked(frozenset(), JID.parse("bob@localhost"))


async def test_blocklist_empty(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_BLOCK, "blocklist")))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone">'
        '<blocklist xmlns="urn:xmpp:blocking"/></iq>'
    )


async def test_block_requires_items(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", block("block")))
    assert_error(alice.one(), "bad-request", "modify")
    await server.send(alice, iq("set", block("block", "bob@localhost", "@bad")))
    assert_error(alice.one(), "jid-malformed", "modify")
    await server.send(alice, iq("set", el(NS_BLOCK, "block", None, el(NS_BLOCK, "item"))))
    assert_error(alice.one(), "bad-request", "modify")
    assert await server.storage.blocklist.get(str(ALICE)) == []


async def test_blocklist_is_only_for_its_owner(server: Server) -> None:
    server.add(Blocking)
    bob = await server.login("bob@localhost/pc")
    await server.send(bob, iq("get", el(NS_BLOCK, "blocklist"), to=ALICE))
    assert_error(bob.one(), "service-unavailable", "cancel")
    await server.send(bob, iq("set", block("block", "carol@localhost"), to=ALICE))
    assert_error(bob.one(), "service-unavailable", "cancel")
    assert await server.storage.blocklist.get(str(ALICE)) == []


async def test_block_pushes_to_resources_that_fetched_the_list(server: Server) -> None:
    server.add(Blocking)
    phone = await server.login("alice@localhost/phone")
    laptop = await server.login("alice@localhost/laptop")
    await server.login("alice@localhost/other")  # never asked for the list: no pushes
    for session in (phone, laptop):
        await server.send(session, iq("get", el(NS_BLOCK, "blocklist")))
        session.take()
    await server.send(phone, iq("set", block("block", "Bob@LOCALHOST", "spam.example")))
    out = phone.take()
    assert wire(out[0]) == '<iq type="result" id="q1" to="alice@localhost/phone"/>'
    items = (
        '<block xmlns="urn:xmpp:blocking"><item jid="bob@localhost"/>'
        '<item jid="spam.example"/></block>'
    )
    assert len(out) == 2 and out[1].get("type") == "set"
    assert (
        wire(out[1])
        == f'<iq to="alice@localhost/phone" type="set" id="{out[1].get("id")}">{items}</iq>'
    )
    push = laptop.one()
    assert (
        wire(push)
        == f'<iq to="alice@localhost/laptop" type="set" id="{push.get("id")}">{items}</iq>'
    )
    assert await server.storage.blocklist.get(str(ALICE)) == ["bob@localhost", "spam.example"]

    await server.send(laptop, iq("get", el(NS_BLOCK, "blocklist"), id_="q2"))
    assert wire(laptop.one()) == (
        '<iq type="result" id="q2" to="alice@localhost/laptop">'
        '<blocklist xmlns="urn:xmpp:blocking"><item jid="bob@localhost"/>'
        '<item jid="spam.example"/></blocklist></iq>'
    )


async def test_blocked_contact_is_silenced(server: Server) -> None:
    server.add(Blocking)
    server.add(Ping)
    alice = await server.login("alice@localhost/phone")
    bob = await server.login("bob@localhost/pc")
    await server.subscribe(BOB, ALICE, "both")
    await server.send(alice, iq("set", block("block", "bob@localhost")))
    alice.take()
    bob.take()

    await server.send(bob, chat(ALICE))
    await server.send(bob, chat("alice@localhost/phone"))
    await server.send(bob, make("presence", to=ALICE, type="subscribe"))
    assert alice.take() == [] and bob.take() == []  # dropped without a word
    await server.send(bob, iq("get", el(NS_PING, "ping"), to="alice@localhost/phone"))
    reply = bob.one()
    assert reply.get("from") == "alice@localhost/phone"
    assert_error(reply, "service-unavailable", "cancel")
    await server.send(bob, iq("get", el(NS_PING, "ping"), to=ALICE))
    assert_error(bob.one(), "service-unavailable", "cancel")
    assert alice.take() == []
    # Unaffected: carol, and bob talking to others.
    carol = await server.login("carol@localhost/x")
    await server.send(carol, chat(ALICE))
    assert [m.findtext(f"{CLIENT}body") for m in alice.take()] == ["hi"]
    await server.send(bob, chat("carol@localhost/x"))
    assert len(carol.take()) == 1


async def test_talking_to_a_blocked_contact_bounces(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    bob = await server.login("bob@localhost/pc")
    await server.send(alice, iq("set", block("block", "bob@localhost")))
    alice.take()
    await server.send(alice, chat(BOB, "hello?"))
    reply = alice.one()
    assert reply.tag == f"{CLIENT}message" and reply.get("from") == "bob@localhost"
    assert_error(reply, "not-acceptable", "cancel")
    assert reply.findtext(f"{CLIENT}body") == "hello?"
    await server.send(alice, iq("get", el(NS_PING, "ping"), to="bob@localhost/pc"))
    assert_error(alice.one(), "not-acceptable", "cancel")
    await server.send(alice, make("presence", to="bob@localhost/pc"))
    assert alice.take() == [] and bob.take() == []


def test_blocked_error_carries_the_blocking_condition() -> None:
    stanza = make("message", to=BOB, from_="alice@localhost/phone", type="chat", id="m1")
    reply = error_reply(stanza, blocking_module.Blocked())
    assert wire(reply) == (
        '<message to="alice@localhost/phone" type="error" id="m1" from="bob@localhost">'
        '<error type="cancel"><not-acceptable xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/>'
        '<blocked xmlns="urn:xmpp:blocking:errors"/></error></message>'
    )


def test_blocked_error_extra_child() -> None:
    error = blocking_module.Blocked()
    assert (error.condition, error.type, error.text) == ("not-acceptable", "cancel", None)
    assert [wire(child) for child in error.extra] == ['<blocked xmlns="urn:xmpp:blocking:errors"/>']


async def test_block_sends_unavailable_only_to_entitled_contacts(server: Server) -> None:
    server.add(Blocking)
    phone = await server.login("alice@localhost/phone")
    laptop = await server.login("alice@localhost/laptop")
    await server.login("alice@localhost/hidden", available=False)
    bob = await server.login("bob@localhost/pc")
    carol = await server.login("carol@localhost/x")
    await server.subscribe(BOB, ALICE, "from")  # bob sees alice; carol does not
    await server.send(phone, iq("set", block("block", "bob@localhost", "carol@localhost")))
    assert sorted(wire(p) for p in bob.take()) == [
        '<presence to="bob@localhost" from="alice@localhost/laptop" type="unavailable"/>',
        '<presence to="bob@localhost" from="alice@localhost/phone" type="unavailable"/>',
    ]
    assert carol.take() == []
    assert [r.get("type") for r in phone.take()] == ["result"]
    assert laptop.take() == []
    # Blocking again tells nobody anything new.
    await server.send(phone, iq("set", block("block", "bob@localhost"), id_="q2"))
    assert bob.take() == []


async def test_block_tells_directed_presence_recipients(server: Server) -> None:
    server.add(Blocking)
    phone = await server.login("alice@localhost/phone")
    carol = await server.login("carol@localhost/x")
    phone.directed.add(JID.parse("carol@localhost/x"))
    await server.send(phone, iq("set", block("block", "carol@localhost")))
    assert [wire(p) for p in carol.take()] == [
        '<presence to="carol@localhost/x" from="alice@localhost/phone" type="unavailable"/>'
    ]


async def test_unblock_restores_traffic_and_presence(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    presence = make("presence")
    ET.SubElement(presence, f"{CLIENT}show").text = "away"
    alice.presence = presence
    bob = await server.login("bob@localhost/pc")
    await server.subscribe(BOB, ALICE, "both")
    await server.send(alice, iq("get", el(NS_BLOCK, "blocklist")))
    await server.send(alice, iq("set", block("block", "bob@localhost", "carol@localhost")))
    alice.take()
    bob.take()

    await server.send(alice, iq("set", block("unblock", "bob@localhost"), id_="q2"))
    out = alice.take()
    assert wire(out[0]) == '<iq type="result" id="q2" to="alice@localhost/phone"/>'
    assert wire(out[1]) == (
        f'<iq to="alice@localhost/phone" type="set" id="{out[1].get("id")}">'
        '<unblock xmlns="urn:xmpp:blocking"><item jid="bob@localhost"/></unblock></iq>'
    )
    assert len(out) == 2
    assert [wire(p) for p in bob.take()] == [
        '<presence from="alice@localhost/phone" to="bob@localhost"><show>away</show></presence>'
    ]
    assert alice.presence.get("to") is None  # the session's own presence is left alone
    await server.send(bob, chat(ALICE))
    assert len(alice.take()) == 1
    assert await server.storage.blocklist.get(str(ALICE)) == ["carol@localhost"]


async def test_unblock_all(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", el(NS_BLOCK, "blocklist")))
    await server.send(alice, iq("set", block("block", "bob@localhost", "carol@localhost")))
    alice.take()
    await server.send(alice, iq("set", block("unblock"), id_="q2"))
    out = alice.take()
    assert [wire(x) for x in out] == [
        '<iq type="result" id="q2" to="alice@localhost/phone"/>',
        f'<iq to="alice@localhost/phone" type="set" id="{out[1].get("id")}">'
        '<unblock xmlns="urn:xmpp:blocking"/></iq>',
    ]
    assert await server.storage.blocklist.get(str(ALICE)) == []
    bob = await server.login("bob@localhost/pc")
    await server.send(bob, chat(ALICE))
    assert len(alice.take()) == 1


async def test_unblock_keeps_contacts_blocked_by_another_item(server: Server) -> None:
    server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    bob = await server.login("bob@localhost/pc")
    await server.subscribe(BOB, ALICE, "from")
    await server.send(alice, iq("set", block("block", "bob@localhost", "localhost")))
    bob.take()
    await server.send(alice, iq("set", block("unblock", "bob@localhost"), id_="q2"))
    assert bob.take() == []  # still blocked by the domain item: no presence
    await server.send(bob, chat(ALICE))
    assert [r.get("type") for r in alice.take()] == ["result", "result"]


async def test_closed_session_gets_no_pushes(server: Server) -> None:
    module = server.add(Blocking)
    old = await server.login("alice@localhost/phone")
    await server.send(old, iq("get", el(NS_BLOCK, "blocklist")))
    await server.router.unbind(old)
    new = await server.login("alice@localhost/phone")
    laptop = await server.login("alice@localhost/laptop")
    old.take()
    await server.send(laptop, iq("set", block("block", "bob@localhost")))
    assert new.take() == [] and old.take() == []
    assert module._requested == {}


async def test_blocklist_cache_follows_changes(server: Server) -> None:
    module = server.add(Blocking)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", block("block", "bob@localhost")))
    assert await module.blocklist(ALICE) == frozenset({BOB})
    await server.send(alice, iq("set", block("unblock", "bob@localhost")))
    assert await module.blocklist(ALICE) == frozenset()
    await server.storage.blocklist.add(str(ALICE), ["carol@localhost"])
    assert await module.blocklist(ALICE) == frozenset()  # cached; storage changed behind it
    module.forget(ALICE)
    assert await module.blocklist(ALICE) == frozenset({CAROL})


# -- XEP-0077 in-band registration ------------------------------------------------------------

NS_REG = "jabber:iq:register"


def reg(*children: tuple[str, str | None]) -> Element:
    query = el(NS_REG, "query")
    for name, text in children:
        ET.SubElement(query, qn(NS_REG, name)).text = text
    return query


async def with_password(server: Server, jid: JID, password: str) -> None:
    await server.storage.accounts.set_credentials(str(jid), make_credentials(password, 4096))


async def test_register_get_when_signed_in(server: Server) -> None:
    server.add(Register)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("get", reg()))
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone"><query xmlns="jabber:iq:register">'
        "<registered/><username>alice</username><password/></query></iq>"
    )


async def test_register_change_password(server: Server) -> None:
    server.add(Register)
    await with_password(server, ALICE, "old password")
    before = await server.storage.accounts.credentials(str(ALICE), "SCRAM-SHA-256")
    alice = await server.login("alice@localhost/phone")
    await server.send(
        alice, iq("set", reg(("username", "Alice"), ("password", "correct horse")), to=DOMAIN)
    )
    assert wire(alice.one()) == (
        '<iq type="result" id="q1" to="alice@localhost/phone" from="localhost"/>'
    )
    after = await server.storage.accounts.credentials(str(ALICE), "SCRAM-SHA-256")
    assert after is not None and before is not None and after.stored_key != before.stored_key
    assert alice.closed == []


@pytest.mark.parametrize(
    ("fields", "condition", "type_"),
    [
        ((("username", "alice"), ("password", "short")), "not-acceptable", "modify"),
        ((("username", "alice"), ("password", "\u0007bell\u0007bell")), "not-acceptable", "modify"),
        ((("username", "bob"), ("password", "long enough")), "forbidden", "auth"),
        ((("username", "alice"), ("password", None)), "bad-request", "modify"),
        ((("password", "long enough"),), "bad-request", "modify"),
    ],
)
async def test_register_change_password_refused(
    server: Server, fields: tuple[tuple[str, str | None], ...], condition: str, type_: str
) -> None:
    server.add(Register)
    await with_password(server, ALICE, "old password")
    before = await server.storage.accounts.credentials(str(ALICE), "SCRAM-SHA-256")
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", reg(*fields)))
    reply = alice.one()
    assert_error(reply, condition, type_)
    assert error_request(reply) == []  # the password is not echoed back
    assert await server.storage.accounts.credentials(str(ALICE), "SCRAM-SHA-256") == before


async def test_register_other_account_is_refused(server: Server) -> None:
    server.add(Register)
    bob = await server.login("bob@localhost/pc")
    await server.send(bob, iq("set", reg(("remove", None)), to=ALICE))
    assert_error(bob.one(), "service-unavailable", "cancel")
    assert await server.storage.accounts.exists(str(ALICE))


async def test_register_remove(server: Server) -> None:
    server.add(Register)
    blocking = server.add(Blocking)
    await server.storage.vcards.set(str(ALICE), "<vCard xmlns='vcard-temp'/>")
    phone = await server.login("alice@localhost/phone")
    laptop = await server.login("alice@localhost/laptop", available=False)
    bob = await server.login("bob@localhost/pc")
    await server.send(phone, iq("set", block("block", "carol@localhost")))
    phone.take()
    await server.send(phone, iq("set", reg(("remove", None))))
    assert wire(phone.one()) == '<iq type="result" id="q1" to="alice@localhost/phone"/>'
    for session in (phone, laptop):
        assert [(e.condition, e.text) for e in session.closed] == [
            ("not-authorized", "the account was removed")
        ]
    assert bob.closed == []
    assert not await server.storage.accounts.exists(str(ALICE))
    assert await server.storage.vcards.get(str(ALICE)) is None
    assert ALICE not in blocking._cache


async def test_register_remove_says_goodbye_to_contacts(storage: Storage, tmp_path: Path) -> None:
    """With the real roster and presence modules: contacts see the account go offline and
    lose their subscriptions before the account is deleted."""
    from xmpp_server.modules.presence import Presence
    from xmpp_server.modules.roster import Roster

    config = build_config({"server": {"domain": DOMAIN}}, base_dir=tmp_path)

    async def account_exists(jid: JID) -> bool:
        return await storage.accounts.exists(str(jid.bare))

    router = Router(DOMAIN, account_exists, entitled(storage))
    srv = Server(FakeHost(config, storage, router, 0.0))
    for module in (Roster, Presence, Register):
        srv.add(module)
    for jid in (ALICE, BOB):
        await storage.accounts.create(str(jid), [])
    await srv.subscribe(BOB, ALICE, "both")
    await srv.subscribe(ALICE, BOB, "both")
    phone = await srv.login("alice@localhost/phone")
    bob = await srv.login("bob@localhost/pc")
    await srv.send(phone, iq("set", reg(("remove", None))))
    stanzas = [(p.get("from"), p.get("type")) for p in bob.take() if p.tag == f"{CLIENT}presence"]
    assert ("alice@localhost/phone", "unavailable") in stanzas
    assert ("alice@localhost", "unsubscribed") in stanzas
    assert ("alice@localhost", "unsubscribe") in stanzas
    item = await storage.rosters.get(str(BOB), str(ALICE))
    assert item is not None and item.subscription == "none"
    assert await storage.last_activity.get(str(ALICE)) is None
    assert [e.condition for e in phone.closed] == ["not-authorized"]


async def test_register_remove_must_be_alone(server: Server) -> None:
    server.add(Register)
    alice = await server.login("alice@localhost/phone")
    await server.send(alice, iq("set", reg(("remove", None), ("username", "alice"))))
    assert_error(alice.one(), "bad-request", "modify")
    assert alice.closed == []
    assert await server.storage.accounts.exists(str(ALICE))


async def test_register_account(server: Server) -> None:
    module = server.add(Register, min_password_length=10)
    await module.register_account("Dave", "long enough pw")
    assert await server.storage.accounts.exists("dave@localhost")
    creds = await server.storage.accounts.credentials("dave@localhost", "SCRAM-SHA-1")
    assert creds is not None and creds.iterations == server.host.config.auth.scram_iterations

    async def refused(username: str, password: str) -> tuple[str, str]:
        with pytest.raises(StanzaError) as info:
            await module.register_account(username, password)
        return info.value.condition, info.value.type

    assert await refused("dave", "another long pw") == ("conflict", "cancel")
    assert await refused("erin", "too short") == ("not-acceptable", "modify")
    assert await refused("bad@name", "long enough pw") == ("not-acceptable", "modify")
    assert await refused("", "long enough pw") == ("not-acceptable", "modify")
    assert not await server.storage.accounts.exists("erin@localhost")


async def test_register_account_closed(server: Server) -> None:
    module = server.add(Register, allow_new_accounts=False)
    with pytest.raises(StanzaError) as info:
        await module.register_account("dave", "long enough pw")
    assert (info.value.condition, info.value.type) == ("not-allowed", "cancel")
    assert not await server.storage.accounts.exists("dave@localhost")


# -- registry -----------------------------------------------------------------------------


def test_module_metadata() -> None:
    assert Ping.features == ("urn:xmpp:ping",)
    assert Version.features == ("jabber:iq:version",)
    assert (VCard.features, VCard.account_features) == (("vcard-temp",), ("vcard-temp",))
    assert LastActivity.features == ("jabber:iq:last",)
    assert Blocking.features == ("urn:xmpp:blocking",)
    assert Register.features == ("jabber:iq:register",) and not Register.enabled_by_default


def test_stanza_ids_are_crockford_ulids_in_time_order() -> None:
    """The fast encoding equals the ULID definition: 26 Crockford base32 characters of
    (48-bit milliseconds << 80 | 80 random bits), most significant first."""
    from xmpp_server.modules.stanza_id import _ALPHABET, new_stanza_id

    ids = [new_stanza_id(1_700_000_000 + i / 1000) for i in range(500)]
    assert ids == sorted(ids) and len(set(ids)) == 500
    for sid in ids:
        assert len(sid) == 26 and set(sid) <= set(_ALPHABET)
        value = 0
        for char in sid:
            value = value * 32 + _ALPHABET.index(char)
        assert value >> 128 == 0  # the two spare leading bits stay zero
        assert value >> 80 == (1_700_000_000_000 + ids.index(sid)) & ((1 << 48) - 1)
