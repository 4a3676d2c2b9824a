"""XEP-0313 message archives through slixmpp's MAM client, on a real server and both backends;
then ``natterctl archive purge``, and the module's pure parts (what is archived, query parsing)."""

from __future__ import annotations

import asyncio
import contextlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.e2e.befriend import befriend
from tests.e2e.harness import (
    DOMAIN,
    TIMEOUT,
    Client,
    add_user,
    clients,
    next_matching,
    running_server,
)
from xmpp_server.cli import ctl_main
from xmpp_server.errors import StanzaError
from xmpp_server.modules.mam import (
    FULLTEXT_FIELD,
    NS_FULLTEXT,
    NS_MAM,
    NS_MAM_EXTENDED,
    ArchiveQuery,
    Mam,
    fin,
    parse_query,
    should_archive,
    stored_copy,
)
from xmpp_server.server import Server
from xmpp_server.storage import ArchiveEntry, ArchivePage, ArchivePrefs, Storage
from xmpp_server.xml import fromstring, tostring

CAROL = f"carol@{DOMAIN}"


class MamClient(Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_plugin("xep_0313")


@dataclass
class Answer:
    results: list[Any]  # the <message><result/></message> stanzas, in the order received
    fin: Any  # the iq result

    @property
    def ids(self) -> list[str]:
        return [r["mam_result"]["id"] for r in self.results]

    @property
    def bodies(self) -> list[str]:
        return [r["mam_result"]["forwarded"]["stanza"]["body"] for r in self.results]

    @property
    def rsm(self) -> Any:
        return self.fin["mam_fin"]["rsm"]

    @property
    def complete(self) -> bool:
        return bool(self.fin.xml.find(f"{{{NS_MAM}}}fin").get("complete") == "true")


async def mam_query(
    client: Client,
    *,
    to: str | None = None,
    fields: dict[str, str | list[str]] | None = None,
    rsm: dict[str, str | bool] | None = None,
    flip: bool = False,
) -> Answer:
    """One query with any fields, collecting the results that carry its queryid."""
    iq = client.make_iq_set(ito=to)
    queryid = iq["id"]
    iq["mam"]["queryid"] = queryid
    for var, value in (fields or {}).items():
        if var == "ids":
            iq["mam"]["ids"] = value
        else:
            iq["mam"].set_custom_field(var, value)
    for key, rsm_value in (rsm or {}).items():
        iq["mam"]["rsm"][key] = rsm_value
    if flip:
        ET.SubElement(iq["mam"].xml, f"{{{NS_MAM}}}flip-page")
    results: list[Any] = []

    def collect(message: Any) -> None:
        if message["mam_result"]["queryid"] == queryid:
            results.append(message)

    name = f"mam-{queryid}"
    client.register_handler(
        Callback(name, MatchXPath(f"{{jabber:client}}message/{{{NS_MAM}}}result"), collect)
    )
    try:
        fin = await iq.send(timeout=TIMEOUT)
    finally:
        client.remove_handler(name)
    return Answer(results, fin)


async def error_of(coro: Any) -> str:
    with pytest.raises(IqError) as caught:
        await coro
    return str(caught.value.iq["error"]["condition"])


def entries(
    n: int, *, start: datetime, with_jid: str = CAROL, prefix: str = "bulk"
) -> Iterator[ArchiveEntry]:
    for i in range(n):
        body = f"bulk message {i}"
        xml = (
            f"<message xmlns='jabber:client' from='{with_jid}/r' to='alice@{DOMAIN}'"
            f" type='chat' id='m{i}'><body>{body}</body></message>"
        )
        yield ArchiveEntry(
            f"{prefix}{i:06d}", f"{with_jid}/r", "in", start + timedelta(seconds=i), xml, body
        )


def recent(seconds: int) -> datetime:
    """A start time for ``seconds`` of archive, ending before now (within any retention)."""
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds + 60)


async def settle(client: Client) -> None:
    """Wait until the server has handled everything the client sent before."""
    await client.plugin["xep_0199"].ping(DOMAIN, timeout=10)


# ── chatting fills both archives ──


async def test_two_users_chat_then_each_retrieves_their_archive(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MamClient(server, a), MamClient(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            received = []
            for text in ("hello bob", "are you there?"):
                alice.send_message(mto=b, mbody=text, mtype="chat")
                received.append(await next_matching(bob.messages, lambda m, t=text: m["body"] == t))
            bob.send_message(mto=a, mbody="yes, hi alice", mtype="chat")
            reply = await next_matching(alice.messages, lambda m: m["body"] == "yes, hi alice")
            alice.send_message(mto=b, mbody="typing...", mtype="chat")  # body: archived
            await next_matching(bob.messages, lambda m: m["body"] == "typing...")
            # Chat states alone, and a no-store hint, stay out of both archives.
            state = alice.make_message(mto=b, mtype="chat")
            state.xml.append(ET.Element("{http://jabber.org/protocol/chatstates}composing"))
            state.send()
            secret = alice.make_message(mto=b, mbody="off the record", mtype="chat")
            secret.xml.append(ET.Element("{urn:xmpp:hints}no-store"))
            secret.send()
            await next_matching(bob.messages, lambda m: m["body"] == "off the record")

            expected = ["hello bob", "are you there?", "yes, hi alice", "typing..."]
            mine = await alice.plugin["xep_0313"].retrieve(rsm={"max": 50})
            theirs = await bob.plugin["xep_0313"].retrieve(rsm={"max": 50})
            for answer in (mine, theirs):
                results = answer["mam"]["results"]
                assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in results] == (
                    expected
                )
                assert answer["mam_fin"]["rsm"]["count"] == "4"
                for result in results:
                    assert result["mam_result"]["forwarded"]["delay"]["stamp"] is not None
            forwarded = [r["mam_result"]["forwarded"]["stanza"] for r in mine["mam"]["results"]]
            assert forwarded[0]["from"] == alice.boundjid and forwarded[0]["to"] == b
            assert forwarded[2]["from"] == bob.boundjid

            # The stanza-id the recipient was given is the id of its archived copy, and the
            # sender's copy has an id of its own.
            bob_ids = [r["mam_result"]["id"] for r in theirs["mam"]["results"]]
            alice_ids = [r["mam_result"]["id"] for r in mine["mam"]["results"]]
            given = [m.xml.find("{urn:xmpp:sid:0}stanza-id") for m in received]
            assert [g.get("id") for g in given] == bob_ids[:2]
            assert all(g.get("by") == b for g in given)
            assert reply.xml.find("{urn:xmpp:sid:0}stanza-id").get("id") == alice_ids[2]
            assert not set(alice_ids) & set(bob_ids)
            # Archived copies do not carry the stanza-ids of any archive.
            assert all(
                f.xml.find("{urn:xmpp:sid:0}stanza-id") is None
                for r in theirs["mam"]["results"]
                if (f := r["mam_result"]["forwarded"]["stanza"]) is not None
            )


async def test_message_to_oneself_is_archived_once(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            alice.send_message(mto=a, mbody="note to self", mtype="chat")
            note = await next_matching(alice.messages, lambda m: m["body"] == "note to self")
            answer = await mam_query(alice, fields={"with": a})
            assert answer.bodies == ["note to self"]
            assert answer.ids == [note.xml.find("{urn:xmpp:sid:0}stanza-id").get("id")]


async def test_messages_to_an_offline_user_are_archived(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            alice.send_message(mto=b, mbody="while you were out", mtype="chat")
            await settle(alice)
        async with clients(MamClient(server, b)) as (bob,):
            await bob.login()
            offline = await next_matching(bob.messages, lambda m: m["body"] == "while you were out")
            answer = await mam_query(bob)
            assert answer.bodies == ["while you were out"]
            assert answer.ids == [offline.xml.find("{urn:xmpp:sid:0}stanza-id").get("id")]


# ── paging ──


async def test_paging_through_10000_messages_forwards_and_backwards(
    migrated_db_url: str, tmp_path: Path
) -> None:
    n = 10_000
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        await server.host.storage.archive.append_many(a, entries(n, start=recent(n)))
        expected = [f"bulk{i:06d}" for i in range(n)]
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            seen = [
                message["mam_result"]["id"]
                async for message in alice.plugin["xep_0313"].iterate(rsm={"max": 250})
            ]
            assert seen == expected

            # Backwards from the end, as a client scrolling up does (<before/> = last page).
            backwards: list[str] = []
            before: str | bool = True
            while True:
                answer = await mam_query(alice, rsm={"max": "250", "before": before})
                assert answer.rsm["count"] == str(n)
                assert answer.rsm["first_index"] == str(n - len(backwards) - 250)
                backwards = answer.ids + backwards
                if answer.complete:
                    break
                before = answer.rsm["first"]
            assert backwards == expected


async def test_max_above_the_cap_is_lowered_and_default_page_is_50(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"mam": {"max_page": 120}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        await server.host.storage.archive.append_many(a, entries(300, start=recent(300)))
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            big = await mam_query(alice, rsm={"max": "1000"})
            assert len(big.results) == 120 and not big.complete
            assert (big.rsm["first_index"], big.rsm["count"]) == ("0", "300")
            default = await mam_query(alice)
            assert len(default.results) == 50
            # <max>0</max> asks for the count only (XEP-0059 §2.7).
            only_count = await mam_query(alice, rsm={"max": "0"})
            assert only_count.results == [] and only_count.rsm["count"] == "300"
            # A page by index (XEP-0059 §2.5).
            at = await mam_query(alice, rsm={"max": "10", "index": "290"})
            assert at.ids == [f"bulk{i:06d}" for i in range(290, 300)] and at.complete


async def test_flipped_page_is_sent_newest_first(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        await server.host.storage.archive.append_many(a, entries(20, start=recent(20)))
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            answer = await mam_query(alice, rsm={"max": "5", "before": True}, flip=True)
            assert answer.ids == [f"bulk{i:06d}" for i in (19, 18, 17, 16, 15)]
            assert (answer.rsm["first"], answer.rsm["last"]) == ("bulk000015", "bulk000019")


# ── filters ──


async def test_filters_with_start_end_after_id_before_id_and_ids(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        start = recent(100)
        archive = server.host.storage.archive
        await archive.append_many(a, entries(10, start=start, with_jid=CAROL, prefix="c"))
        await archive.append_many(
            a, entries(10, start=start + timedelta(seconds=20), with_jid=f"dave@{DOMAIN}")
        )
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            by_carol = await mam_query(alice, fields={"with": CAROL})
            assert by_carol.ids == [f"c{i:06d}" for i in range(10)]
            by_resource = await mam_query(alice, fields={"with": f"{CAROL}/r"})
            assert by_resource.ids == by_carol.ids
            assert (await mam_query(alice, fields={"with": f"{CAROL}/other"})).ids == []

            stamp = (start + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
            until = (start + timedelta(seconds=5)).isoformat()  # +00:00 is fine too
            window = await mam_query(alice, fields={"start": stamp, "end": until})
            assert window.ids == ["c000003", "c000004", "c000005"]

            between = await mam_query(
                alice, fields={"after-id": "c000007", "before-id": "bulk000002"}
            )
            assert between.ids == ["c000008", "c000009", "bulk000000", "bulk000001"]
            assert between.rsm["count"] == "4"

            chosen = await mam_query(alice, fields={"ids": ["bulk000005", "c000001"]})
            assert chosen.ids == ["c000001", "bulk000005"]

            combined = await mam_query(
                alice, fields={"with": f"dave@{DOMAIN}", "after-id": "bulk000007"}
            )
            assert combined.ids == ["bulk000008", "bulk000009"]


async def test_full_text_search_finds_a_message_by_a_word_in_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MamClient(server, a), MamClient(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            for text in ("Meet me at the lighthouse", "bring the blue umbrella", "see you"):
                alice.send_message(mto=b, mbody=text, mtype="chat")
                await next_matching(bob.messages, lambda m, t=text: m["body"] == t)
            fields = await alice.plugin["xep_0313"].get_fields()
            assert FULLTEXT_FIELD in fields.get_fields()
            found = await mam_query(bob, fields={FULLTEXT_FIELD: "Umbrella"})
            assert found.bodies == ["bring the blue umbrella"]
            both = await mam_query(alice, fields={FULLTEXT_FIELD: "the", "with": b})
            assert both.bodies == ["Meet me at the lighthouse", "bring the blue umbrella"]


async def test_full_text_off_is_neither_advertised_nor_accepted(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"mam": {"full_text": False}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            info = await alice.plugin["xep_0030"].get_info(jid=a)
            features = info["disco_info"]["features"]
            assert NS_MAM in features and NS_FULLTEXT not in features
            fields = await alice.plugin["xep_0313"].get_fields()
            assert FULLTEXT_FIELD not in fields.get_fields()
            query = mam_query(alice, fields={FULLTEXT_FIELD: "x"})
            assert await error_of(query) == "feature-not-implemented"


# ── errors ──


async def test_bad_requests_get_the_conditions_of_xep_0313(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        await server.host.storage.archive.append_many(a, entries(3, start=recent(3)))
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()

            async def condition(**kwargs: Any) -> str:
                return await error_of(mam_query(alice, **kwargs))

            assert await condition(rsm={"after": "no-such-id"}) == "item-not-found"
            assert await condition(rsm={"before": "no-such-id"}) == "item-not-found"
            assert await condition(fields={"after-id": "no-such-id"}) == "item-not-found"
            assert await condition(fields={"ids": ["bulk000000", "nope"]}) == "item-not-found"
            assert await condition(fields={"start": "yesterday"}) == "bad-request"
            assert await condition(fields={"end": "2026-01-01T00:00:00"}) == "bad-request"
            assert await condition(fields={"with": "@@"}) == "bad-request"
            assert await condition(rsm={"max": "-1"}) == "bad-request"
            assert await condition(fields={"x-unknown": "1"}) == "feature-not-implemented"


async def test_another_users_archive_is_refused(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        await server.host.storage.archive.append_many(b, entries(3, start=recent(3)))
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            # As for an account that does not exist: strangers learn nothing (issue 13, #9).
            assert await error_of(mam_query(alice, to=b)) == "service-unavailable"
            metadata = alice.plugin["xep_0313"].get_archive_metadata(jid=b)
            assert await error_of(metadata) == "service-unavailable"
            prefs = alice.make_iq_get(ito=b)
            prefs.xml.append(ET.Element(f"{{{NS_MAM}}}prefs"))
            assert await error_of(prefs.send(timeout=TIMEOUT)) == "service-unavailable"
            # Addressed to her own bare JID it is her (empty) archive.
            assert (await mam_query(alice, to=a)).results == []


# ── discovery and metadata ──


async def test_account_advertises_mam_and_reports_metadata(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(MamClient(server, a)) as (alice,):
            await alice.login()
            info = await alice.plugin["xep_0030"].get_info(jid=a)
            assert {NS_MAM, NS_MAM_EXTENDED, NS_FULLTEXT} <= set(info["disco_info"]["features"])
            empty = await alice.plugin["xep_0313"].get_archive_metadata()
            assert len(empty.xml.find(f"{{{NS_MAM}}}metadata")) == 0
            start = recent(5)
            await server.host.storage.archive.append_many(a, entries(5, start=start))
            metadata = await alice.plugin["xep_0313"].get_archive_metadata()
            assert metadata["mam_metadata"]["start"]["id"] == "bulk000000"
            assert metadata["mam_metadata"]["start"]["timestamp"] == start
            assert metadata["mam_metadata"]["end"]["id"] == "bulk000004"


# ── storage modes and preferences ──


async def get_prefs(client: Client, to: str | None = None) -> ET.Element:
    iq = client.make_iq_get(ito=to)
    iq.xml.append(ET.Element(f"{{{NS_MAM}}}prefs"))
    result = await iq.send(timeout=TIMEOUT)
    return result.xml.find(f"{{{NS_MAM}}}prefs")


async def set_prefs(
    client: Client, default: str, always: tuple[str, ...] = (), never: tuple[str, ...] = ()
) -> ET.Element:
    iq = client.make_iq_set()
    prefs = ET.SubElement(iq.xml, f"{{{NS_MAM}}}prefs", {"default": default})
    for name, jids in (("always", always), ("never", never)):
        listed = ET.SubElement(prefs, f"{{{NS_MAM}}}{name}")
        for jid in jids:
            ET.SubElement(listed, f"{{{NS_MAM}}}jid").text = jid
    result = await iq.send(timeout=TIMEOUT)
    return result.xml.find(f"{{{NS_MAM}}}prefs")


def listed(prefs: ET.Element, name: str) -> list[str]:
    return [j.text or "" for j in prefs.findall(f"{{{NS_MAM}}}{name}/{{{NS_MAM}}}jid")]


async def chat(sender: Client, recipient: Client, text: str) -> None:
    sender.send_message(mto=recipient.boundjid.bare, mbody=text, mtype="chat")
    await next_matching(recipient.messages, lambda m: m["body"] == text)


async def test_ephemeral_mode_archives_nothing_unless_a_user_opts_in(
    migrated_db_url: str, tmp_path: Path
) -> None:
    overrides = {"modules": {"mam": {"mode": "ephemeral"}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(MamClient(server, a), MamClient(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            prefs = await get_prefs(alice)
            assert prefs.get("default") == "never"
            assert (listed(prefs, "always"), listed(prefs, "never")) == ([], [])
            await chat(alice, bob, "gone once read")
            await chat(bob, alice, "like this one")
            assert (await mam_query(alice)).results == [] and (await mam_query(bob)).results == []

            # The user may override the server's default: only her copies are kept.
            applied = await set_prefs(alice, "always")
            assert applied.get("default") == "always"
            await chat(alice, bob, "keep this")
            await chat(bob, alice, "and this")
            assert (await mam_query(alice)).bodies == ["keep this", "and this"]
            assert (await mam_query(bob)).results == []


@contextlib.asynccontextmanager
async def logged_in(server: Server, *jids: str) -> AsyncIterator[tuple[MamClient, ...]]:
    """MAM clients for ``jids``, each logged in with initial presence."""
    users = tuple(MamClient(server, jid) for jid in jids)
    async with clients(*users):
        for client in users:
            await client.login()
        yield users


async def test_preferences_and_blocks_set_before_a_restart_hold_after_it(
    migrated_db_url: str, tmp_path: Path
) -> None:
    """The server knows at start who has preferences or a blocklist and skips the lookup
    for everyone else, so what was stored before must be in force from the first message."""
    overrides = {"modules": {"mam": {"mode": "ephemeral"}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        c = await add_user(server, "carol")
        async with clients(MamClient(server, a), MamClient(server, c)) as (alice, carol):
            alice.register_plugin("xep_0191")
            await alice.login()
            await carol.login()
            await set_prefs(alice, "always")
            await alice.plugin["xep_0191"].block(c)
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        async with logged_in(server, a, b, c) as (alice, bob, carol):
            await chat(bob, alice, "kept for alice")
            carol.send_message(mto=a, mbody="blocked still", mtype="chat")
            await chat(bob, carol, "carol's message went first")
            assert (await mam_query(alice)).bodies == ["kept for alice"]
            assert (await mam_query(bob)).results == []
            assert not [m for m in alice.messages.items if m["body"] == "blocked still"]


async def test_override_denied_keeps_the_servers_mode(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"mam": {"mode": "ephemeral", "allow_user_override": False}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        # Preferences stored earlier, while overrides were allowed, no longer count.
        await server.host.storage.archive.set_prefs(a, ArchivePrefs("always"))
        async with clients(MamClient(server, a), MamClient(server, b)) as (alice, bob):
            await alice.login()
            await bob.login()
            assert (await get_prefs(alice)).get("default") == "never"
            assert await error_of(set_prefs(alice, "always")) == "not-allowed"
            assert await error_of(set_prefs(alice, "never", never=(b,))) == "not-allowed"
            await chat(alice, bob, "not kept")
            assert (await mam_query(alice)).results == []


async def test_archive_mode_with_never_and_roster_preferences(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        c = await add_user(server, "carol")
        async with logged_in(server, a, b, c) as (alice, bob, carol):
            assert (await get_prefs(alice)).get("default") == "always"
            # Never with Carol, whatever the default.
            applied = await set_prefs(alice, "always", never=(c, c))
            assert listed(applied, "never") == [c]
            await chat(alice, carol, "private to carol")
            await chat(alice, bob, "hi bob")
            assert (await mam_query(alice)).bodies == ["hi bob"]
            assert (await mam_query(carol)).bodies == ["private to carol"]

            # 'roster': only contacts in the roster; an 'always' JID in any case.
            await befriend(alice, bob)
            await set_prefs(alice, "roster", always=(f"{c}/desk",))
            await chat(bob, alice, "from a contact")
            await chat(carol, alice, "from a stranger")
            carol.send_message(mto=a, mbody="wrong resource", mtype="chat")
            await next_matching(alice.messages, lambda m: m["body"] == "wrong resource")
            stored = await get_prefs(alice)
            assert (stored.get("default"), listed(stored, "always")) == ("roster", [f"{c}/desk"])
            assert (await mam_query(alice)).bodies == ["hi bob", "from a contact"]

            bad = set_prefs(alice, "sometimes")
            assert await error_of(bad) == "bad-request"


# ── retention ──


async def test_retention_purges_old_messages(migrated_db_url: str, tmp_path: Path) -> None:
    overrides = {"modules": {"mam": {"retention_days": 30}}}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        archive = server.host.storage.archive
        old = datetime.now(UTC) - timedelta(days=40)
        await archive.append_many(a, entries(5, start=old, prefix="old"))
        await archive.append_many(a, entries(5, start=recent(5), prefix="new"))
        mam = server.host.modules["mam"]
        assert isinstance(mam, Mam)
        assert await mam.purge_expired() == 5
        page = await archive.query(a)
        assert [i.stanza_id for i in page.items] == [f"new{i:06d}" for i in range(5)]


async def test_retention_task_runs_at_start_and_stops_with_the_server(
    migrated_db_url: str, tmp_path: Path
) -> None:
    async with await Storage.open(migrated_db_url) as storage:
        old = datetime.now(UTC) - timedelta(days=400)
        await storage.archive.append_many(f"alice@{DOMAIN}", entries(3, start=old))
    async with running_server(migrated_db_url, tmp_path) as server:
        mam = server.host.modules["mam"]
        assert isinstance(mam, Mam) and mam._purger is not None
        async with asyncio.timeout(TIMEOUT):
            while (await server.host.storage.archive.query(f"alice@{DOMAIN}")).count:
                await asyncio.sleep(0.05)
        purger = mam._purger
    assert purger.done()


def test_natterctl_archive_purge(migrated_db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "natterd.toml"
    config.write_text(
        f'[server]\ndomain = "{DOMAIN}"\n[storage]\nurl = "{migrated_db_url}"\n'
        "[modules.mam]\nretention_days = 30\n",
        encoding="utf-8",
    )
    alice, bob = f"alice@{DOMAIN}", f"bob@{DOMAIN}"

    async def fill() -> None:
        async with await Storage.open(migrated_db_url) as storage:
            for user in (alice, bob):
                for days, prefix in ((100, "older"), (40, "old"), (0, "new")):
                    start = datetime.now(UTC) - timedelta(days=days, hours=1)
                    await storage.archive.append_many(user, entries(2, start=start, prefix=prefix))

    async def left(user: str) -> int:
        async with await Storage.open(migrated_db_url) as storage:
            return (await storage.archive.query(user)).count

    asyncio.run(fill())

    def ctl(*args: str) -> int:
        return ctl_main(["--config", str(config), "archive", "purge", *args])

    assert ctl("--older-than", "60", "--user", bob) == 0
    assert (asyncio.run(left(alice)), asyncio.run(left(bob))) == (6, 4)
    assert ctl() == 0  # the configured 30 days
    assert (asyncio.run(left(alice)), asyncio.run(left(bob))) == (2, 2)
    assert ctl("--older-than", "-1") == 2
    assert ctl("--user", "mallory@elsewhere.example") == 2


# ── the module's pure parts: what is archived, how a query reads, what <fin/> says ──


def message(xml: str) -> ET.Element:
    return fromstring(f"<message xmlns='jabber:client' from='a@{DOMAIN}/r' {xml}</message>")


@pytest.mark.parametrize(
    ("xml", "archived"),
    [
        ("type='chat'><body>hi</body>", True),
        ("><body>a normal message</body>", True),
        ("type='chat'><received xmlns='urn:xmpp:receipts' id='x'/>", True),
        ("type='chat'><displayed xmlns='urn:xmpp:chat-markers:0' id='x'/>", True),
        ("type='chat'><replace xmlns='urn:xmpp:message-correct:0' id='x'/><body>fix</body>", True),
        ("type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/>", True),
        ("type='chat'><encrypted xmlns='urn:xmpp:omemo:2'/>", True),
        ("type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/>", False),
        ("type='chat'><request xmlns='urn:xmpp:receipts'/>", False),
        ("type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/>", False),
        ("type='chat'><body>x</body><no-permanent-store xmlns='urn:xmpp:hints'/>", False),
        ("type='headline'><body>news</body>", False),
        ("type='headline'><body>keep</body><store xmlns='urn:xmpp:hints'/>", True),
        (
            "type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/>"
            "<store xmlns='urn:xmpp:hints'/>",
            True,
        ),
        ("type='groupchat'><body>room</body>", False),
        ("type='error'><body>x</body><store xmlns='urn:xmpp:hints'/>", False),
    ],
)
def test_what_is_archived(xml: str, archived: bool) -> None:
    assert should_archive(message(xml)) is archived


def test_stored_copy_drops_this_servers_stanza_ids_and_delays_only() -> None:
    original = message(
        "type='chat'><body>one</body><body xml:lang='de'>eins</body>"
        f"<stanza-id xmlns='urn:xmpp:sid:0' by='b@{DOMAIN}' id='1'/>"
        "<stanza-id xmlns='urn:xmpp:sid:0' by='room@muc.example.net' id='2'/>"
        f"<delay xmlns='urn:xmpp:delay' from='{DOMAIN}' stamp='2026-01-01T00:00:00Z'/>"
        "<delay xmlns='urn:xmpp:delay' stamp='2025-01-01T00:00:00Z'/>"
        "<origin-id xmlns='urn:xmpp:sid:0' id='o'/>"
    )
    xml, body = stored_copy(original, DOMAIN)
    copy = fromstring(xml)
    assert body == "one\neins"
    assert [s.get("by") for s in copy.findall("{urn:xmpp:sid:0}stanza-id")] == [
        "room@muc.example.net"
    ]
    assert [d.get("stamp") for d in copy.findall("{urn:xmpp:delay}delay")] == [
        "2025-01-01T00:00:00Z"
    ]
    assert copy.find("{urn:xmpp:sid:0}origin-id") is not None
    assert len(original) == 7  # the message being delivered is left alone


def query_element(form: str = "", rsm: str = "", extra: str = "") -> ET.Element:
    fields = f"<x xmlns='jabber:x:data' type='submit'>{form}</x>" if form else ""
    rsm_set = f"<set xmlns='http://jabber.org/protocol/rsm'>{rsm}</set>" if rsm else ""
    return fromstring(f"<query xmlns='{NS_MAM}'>{fields}{rsm_set}{extra}</query>")


def field(var: str, *values: str) -> str:
    return f"<field var='{var}'>" + "".join(f"<value>{v}</value>" for v in values) + "</field>"


def test_parse_query_reads_every_field_and_rsm() -> None:
    request = parse_query(
        query_element(
            field("FORM_TYPE", NS_MAM)
            + field("with", "Bob@Example.ORG/Phone")
            + field("start", "2026-01-02T03:04:05Z")
            + field("end", "2026-01-02T05:04:05.5+02:00")
            + field("after-id", "a")
            + field("before-id", "b")
            + field("ids", "x", "y")
            + field(FULLTEXT_FIELD, "hello world"),
            "<max>500</max><before/>",
            f"<flip-page xmlns='{NS_MAM}'/>",
        ),
        full_text=True,
        max_page=250,
    )
    assert request.with_jid == "bob@example.org/Phone"
    assert request.start == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert request.end == datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    assert (request.after_id, request.before_id, request.ids) == ("a", "b", ("x", "y"))
    assert (request.text, request.limit, request.before, request.flip) == (
        "hello world",
        250,
        "",
        True,
    )


def test_parse_query_defaults() -> None:
    assert parse_query(query_element(), full_text=True, max_page=250) == ArchiveQuery()
    assert parse_query(query_element(), full_text=True, max_page=20).limit == 20
    empty_ids = query_element(field("ids") + field("with"))
    assert parse_query(empty_ids, full_text=True, max_page=250) == ArchiveQuery()


@pytest.mark.parametrize(
    ("form", "rsm", "condition"),
    [
        (field("FORM_TYPE", "urn:xmpp:mam:1"), "", "bad-request"),
        (field("start", "2026-01-02"), "", "bad-request"),
        (field("start", "2026-01-02T00:00:00"), "", "bad-request"),
        (field("end", "soon"), "", "bad-request"),
        (field("with", "a@b", "c@d"), "", "bad-request"),
        (field("include-groupchat", "true"), "", "feature-not-implemented"),
        (field(FULLTEXT_FIELD, "x"), "", "feature-not-implemented"),  # full text is off here
        (field("ids", *[str(i) for i in range(1001)]), "", "policy-violation"),
        ("", "<max>many</max>", "bad-request"),
        ("", "<index>-3</index>", "bad-request"),
        ("", "<after/>", "bad-request"),
        ("", "<after>a</after><before>b</before>", "bad-request"),
        ("", "<index>2</index><before/>", "bad-request"),
    ],
)
def test_parse_query_refuses_bad_input(form: str, rsm: str, condition: str) -> None:
    with pytest.raises(StanzaError) as caught:
        parse_query(query_element(form, rsm), full_text=False, max_page=250)
    assert caught.value.condition == condition


def test_fin_leaves_out_what_is_not_known() -> None:
    empty = fin(ArchivePage([], None, None, True, 0, None))
    assert tostring(empty) == (
        f'<fin xmlns="{NS_MAM}" complete="true">'
        '<set xmlns="http://jabber.org/protocol/rsm"><count>0</count></set></fin>'
    )
    uncounted = fin(ArchivePage([], "a", "b", False, None, None))
    assert tostring(uncounted) == (
        f'<fin xmlns="{NS_MAM}" complete="false">'
        '<set xmlns="http://jabber.org/protocol/rsm"><first>a</first><last>b</last></set></fin>'
    )
