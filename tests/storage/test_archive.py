"""The archive store's contract (XEP-0313 paging, filters, full text, retention, preferences),
run against every backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import IntegrityError

from xmpp_server.storage import (
    ArchiveEntry,
    ArchivePrefs,
    Storage,
    UnknownArchiveId,
)
from xmpp_server.storage import archive as archive_module
from xmpp_server.storage.archive import fts5_query

ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def entry(
    i: int,
    *,
    with_jid: str = BOB,
    body: str | None = None,
    at: datetime | None = None,
    prefix: str = "id",
) -> ArchiveEntry:
    text = f"message number {i}" if body is None else body
    return ArchiveEntry(
        stanza_id=f"{prefix}{i:06d}",
        with_jid=with_jid,
        direction="out" if i % 2 else "in",
        timestamp=at if at is not None else T0 + timedelta(seconds=i),
        xml=f"<message xmlns='jabber:client' type='chat'><body>{text}</body></message>",
        body=text,
    )


async def fill(storage: Storage, owner: str, n: int, **kwargs: object) -> list[str]:
    entries = [entry(i, **kwargs) for i in range(n)]  # type: ignore[arg-type]
    await storage.archive.append_many(owner, entries)
    return [e.stanza_id for e in entries]


# ── appending and reading back ──


async def test_append_then_query_returns_every_field(storage: Storage) -> None:
    stamp = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    row_id = await storage.archive.append(
        ALICE, "01ABC", f"{BOB}/phone", "in", stamp, "<message/>", "hello"
    )
    assert isinstance(row_id, int)
    page = await storage.archive.query(ALICE)
    assert [(i.stanza_id, i.with_jid, i.direction, i.xml) for i in page.items] == [
        ("01ABC", f"{BOB}/phone", "in", "<message/>")
    ]
    assert page.items[0].timestamp == stamp and page.items[0].timestamp.tzinfo is not None
    assert (page.first, page.last, page.complete, page.count, page.index) == (
        "01ABC",
        "01ABC",
        True,
        1,
        0,
    )


async def test_timestamps_in_other_zones_are_stored_as_the_same_instant(storage: Storage) -> None:
    plus_two = datetime(2026, 1, 1, 16, 0, tzinfo=timezone(timedelta(hours=2)))
    await storage.archive.append(ALICE, "a", BOB, "out", plus_two, "<m/>")
    (item,) = (await storage.archive.query(ALICE)).items
    assert item.timestamp == datetime(2026, 1, 1, 14, 0, tzinfo=UTC)


async def test_empty_archive_gives_an_empty_complete_page(storage: Storage) -> None:
    page = await storage.archive.query(ALICE)
    assert (page.items, page.first, page.last, page.complete, page.count, page.index) == (
        [],
        None,
        None,
        True,
        0,
        None,
    )
    assert await storage.archive.metadata(ALICE) is None


async def test_stanza_ids_are_unique_per_owner_only(storage: Storage) -> None:
    await storage.archive.append(ALICE, "same", BOB, "out", T0, "<m/>")
    await storage.archive.append(BOB, "same", ALICE, "in", T0, "<m/>")
    with pytest.raises(IntegrityError):
        await storage.archive.append(ALICE, "same", BOB, "out", T0, "<m/>")


async def test_archives_are_per_owner_including_rooms(storage: Storage) -> None:
    room = "lobby@conference.example.org"
    await fill(storage, ALICE, 3)
    await storage.archive.append(room, "r1", f"{room}/nick", "in", T0, "<m/>", "room talk")
    assert [i.stanza_id for i in (await storage.archive.query(room)).items] == ["r1"]
    assert (await storage.archive.query(ALICE)).count == 3
    assert (await storage.archive.query(BOB)).count == 0


async def test_items_with_the_same_timestamp_keep_arrival_order(storage: Storage) -> None:
    for sid in ("z", "a", "m"):
        await storage.archive.append(ALICE, sid, BOB, "out", T0, f"<m id='{sid}'/>")
    page = await storage.archive.query(ALICE)
    assert [i.stanza_id for i in page.items] == ["z", "a", "m"]
    later = await storage.archive.query(ALICE, after="z")
    assert [i.stanza_id for i in later.items] == ["a", "m"]
    earlier = await storage.archive.query(ALICE, before="m")
    assert [i.stanza_id for i in earlier.items] == ["z", "a"]


async def test_metadata_names_the_oldest_and_newest_item(storage: Storage) -> None:
    await fill(storage, ALICE, 5)
    bounds = await storage.archive.metadata(ALICE)
    assert bounds is not None
    first, last = bounds
    assert (first.stanza_id, first.timestamp) == ("id000000", T0)
    assert (last.stanza_id, last.timestamp) == ("id000004", T0 + timedelta(seconds=4))


# ── RSM paging ──


async def test_paging_forwards_and_backwards_through_10000_items(storage: Storage) -> None:
    n = 10_000
    expected = await fill(storage, ALICE, n)
    await fill(storage, BOB, 50, with_jid=ALICE)  # another owner's rows interleave nothing

    seen: list[str] = []
    page = await storage.archive.query(ALICE, limit=250)
    while True:
        assert page.count == n and page.index == len(seen)
        seen += [i.stanza_id for i in page.items]
        assert page.first == page.items[0].stanza_id and page.last == page.items[-1].stanza_id
        if page.complete:
            break
        page = await storage.archive.query(ALICE, after=page.last, limit=250)
    assert seen == expected

    backwards: list[str] = []
    page = await storage.archive.query(ALICE, before="", limit=300)
    while True:
        assert page.count == n and page.index == n - len(backwards) - len(page.items)
        backwards = [i.stanza_id for i in page.items] + backwards
        if page.complete:
            break
        page = await storage.archive.query(ALICE, before=page.first, limit=300)
    assert backwards == expected
    assert page.index == 0

    # After the newest item there is nothing, and that page is complete.
    tail = await storage.archive.query(ALICE, after=expected[-1])
    assert (tail.items, tail.complete, tail.count, tail.index) == ([], True, n, None)


async def test_page_by_index(storage: Storage) -> None:
    expected = await fill(storage, ALICE, 30)
    page = await storage.archive.query(ALICE, index=10, limit=5)
    assert [i.stanza_id for i in page.items] == expected[10:15]
    assert (page.index, page.complete) == (10, False)
    last = await storage.archive.query(ALICE, index=27, limit=5)
    assert [i.stanza_id for i in last.items] == expected[27:]
    assert last.complete


async def test_last_page_is_in_chronological_order(storage: Storage) -> None:
    expected = await fill(storage, ALICE, 12)
    page = await storage.archive.query(ALICE, before="", limit=5)
    assert [i.stanza_id for i in page.items] == expected[7:]
    assert (page.index, page.complete, page.count) == (7, False, 12)
    whole = await storage.archive.query(ALICE, before="", limit=50)
    assert whole.complete and whole.index == 0


async def test_limit_zero_returns_only_the_count(storage: Storage) -> None:
    await fill(storage, ALICE, 7)
    page = await storage.archive.query(ALICE, limit=0)
    assert (page.items, page.count, page.first) == ([], 7, None)
    assert not page.complete


async def test_count_limit_leaves_large_counts_and_their_indexes_out(storage: Storage) -> None:
    expected = await fill(storage, ALICE, 20)
    await storage.archive.append_many(
        ALICE,
        [
            entry(i, with_jid=CAROL, prefix="c", at=T0 + timedelta(days=1, seconds=i))
            for i in range(5)
        ],
    )
    first = await storage.archive.query(ALICE, limit=5, count_limit=10)
    assert (first.count, first.index) == (None, 0)
    assert [i.stanza_id for i in first.items] == expected[:5] and not first.complete
    after = await storage.archive.query(ALICE, after=expected[4], limit=5, count_limit=10)
    assert (after.count, after.index) == (None, None)
    assert [i.stanza_id for i in after.items] == expected[5:10]
    last = await storage.archive.query(ALICE, before="", limit=5, count_limit=10)
    assert (last.count, last.index, last.complete) == (None, None, False)
    # Few enough matches are counted as usual, the limit itself included.
    few = await storage.archive.query(ALICE, with_jid=CAROL, before="", limit=2, count_limit=10)
    assert (few.count, few.index) == (5, 3)
    exact = await storage.archive.query(ALICE, after=expected[9], limit=5, count_limit=25)
    assert (exact.count, exact.index) == (25, 10)


async def test_page_cursors_combine_with_filters(storage: Storage) -> None:
    await fill(storage, ALICE, 40, with_jid=BOB)
    await storage.archive.append_many(
        ALICE, [entry(i, with_jid=CAROL, prefix="c") for i in range(40)]
    )
    page = await storage.archive.query(ALICE, with_jid=CAROL, limit=10)
    assert (page.count, page.index) == (40, 0)
    # A cursor need not match the filters itself: paging goes on from its position.
    after_bob = await storage.archive.query(ALICE, with_jid=CAROL, after="id000019", limit=5)
    assert [i.stanza_id for i in after_bob.items] == [f"c{i:06d}" for i in range(19, 24)]
    assert after_bob.index == 19


# ── filters ──


async def test_with_bare_jid_matches_every_resource_and_full_jid_only_that_one(
    storage: Storage,
) -> None:
    await storage.archive.append_many(
        ALICE,
        [
            entry(0, with_jid=f"{BOB}/phone"),
            entry(1, with_jid=f"{BOB}/laptop"),
            entry(2, with_jid=BOB),
            entry(3, with_jid=CAROL),
        ],
    )
    bare = await storage.archive.query(ALICE, with_jid=BOB)
    assert [i.stanza_id for i in bare.items] == ["id000000", "id000001", "id000002"]
    assert bare.count == 3
    full = await storage.archive.query(ALICE, with_jid=f"{BOB}/laptop")
    assert [(i.stanza_id, i.with_jid) for i in full.items] == [("id000001", f"{BOB}/laptop")]
    # A message to oneself: 'with' is the owner's own JID.
    await storage.archive.append(ALICE, "self", ALICE, "in", T0, "<m/>")
    assert [i.stanza_id for i in (await storage.archive.query(ALICE, with_jid=ALICE)).items] == [
        "self"
    ]


async def test_start_and_end_are_inclusive(storage: Storage) -> None:
    await fill(storage, ALICE, 10)
    page = await storage.archive.query(
        ALICE, start=T0 + timedelta(seconds=3), end=T0 + timedelta(seconds=6)
    )
    assert [i.stanza_id for i in page.items] == [f"id{i:06d}" for i in (3, 4, 5, 6)]
    assert page.count == 4
    micro = T0 + timedelta(seconds=3, microseconds=1)
    assert (await storage.archive.query(ALICE, start=micro, end=micro)).count == 0


async def test_after_id_and_before_id_are_exclusive_filters(storage: Storage) -> None:
    await fill(storage, ALICE, 10)
    page = await storage.archive.query(ALICE, after_id="id000002", before_id="id000007")
    assert [i.stanza_id for i in page.items] == [f"id{i:06d}" for i in range(3, 7)]
    # Unlike RSM 'before', before-id does not page backwards: the oldest come first.
    limited = await storage.archive.query(ALICE, before_id="id000007", limit=2)
    assert [i.stanza_id for i in limited.items] == ["id000000", "id000001"]
    assert (limited.count, limited.complete) == (7, False)


async def test_ids_fetch_exactly_those_items_in_archive_order(storage: Storage) -> None:
    await fill(storage, ALICE, 10)
    page = await storage.archive.query(ALICE, ids=["id000008", "id000001", "id000005"])
    assert [i.stanza_id for i in page.items] == ["id000001", "id000005", "id000008"]
    assert page.count == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"after": "nope"},
        {"before": "nope"},
        {"after_id": "nope"},
        {"before_id": "nope"},
        {"ids": ["id000001", "nope"]},
        {"after": "bob-only"},  # another owner's item is not in this archive
    ],
)
async def test_unknown_ids_raise_unknown_archive_id(
    storage: Storage, kwargs: dict[str, object]
) -> None:
    await fill(storage, ALICE, 3)
    await storage.archive.append(BOB, "bob-only", ALICE, "in", T0, "<m/>")
    with pytest.raises(UnknownArchiveId) as caught:
        await storage.archive.query(ALICE, **kwargs)  # type: ignore[arg-type]
    assert caught.value.stanza_id in ("nope", "bob-only")


async def test_paging_after_and_before_at_once_is_refused(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.archive.query(ALICE, after="a", before="b")


# ── full-text search ──


async def test_full_text_finds_every_word_in_any_case_and_order(storage: Storage) -> None:
    bodies = [
        "Shall we meet at the Lighthouse tomorrow?",
        "the lighthouse keeper says hello",
        "tomorrow is fine",
        "nothing to see here",
    ]
    await storage.archive.append_many(
        ALICE, [entry(i, body=b) for i, b in enumerate(bodies)] + [entry(9, body="")]
    )
    await storage.archive.append(ALICE, "nobody", BOB, "in", T0, "<m/>", None)

    async def found(words: str, **kwargs: object) -> list[int]:
        page = await storage.archive.query(ALICE, text=words, **kwargs)  # type: ignore[arg-type]
        return [int(i.stanza_id[2:]) for i in page.items]

    assert await found("lighthouse") == [0, 1]
    assert await found("TOMORROW lighthouse") == [0]
    assert await found("tomorrow") == [0, 2]
    assert await found("lighthouse zebra") == []
    assert await found("light") == []  # whole words, not prefixes
    assert await found("tomorrow", after="id000000") == [2]
    assert (await storage.archive.query(ALICE, text="the")).count == 2


@pytest.mark.parametrize(
    "words", ['"keeper', "keeper*", "keeper OR zebra", "body:keeper", "-keeper", "(keeper"]
)
async def test_full_text_operators_are_plain_words(storage: Storage, words: str) -> None:
    await storage.archive.append(ALICE, "k", BOB, "in", T0, "<m/>", "the keeper says hello")
    page = await storage.archive.query(ALICE, text=words)
    expected = [] if ("OR" in words or "body" in words) else ["k"]
    assert [i.stanza_id for i in page.items] == expected


async def test_full_text_of_only_punctuation_finds_nothing_and_blank_is_no_filter(
    storage: Storage,
) -> None:
    await fill(storage, ALICE, 3)
    assert (await storage.archive.query(ALICE, text="?!")).count == 0
    assert (await storage.archive.query(ALICE, text="  ")).count == 3


async def test_full_text_is_per_owner(storage: Storage) -> None:
    await storage.archive.append(ALICE, "a", BOB, "out", T0, "<m/>", "secret plans")
    await storage.archive.append(BOB, "b", ALICE, "in", T0, "<m/>", "secret plans")
    page = await storage.archive.query(BOB, text="secret")
    assert [i.stanza_id for i in page.items] == ["b"]


def test_fts5_query_quotes_each_word() -> None:
    assert fts5_query('He said "hi" NEAR(x) a_b') == '"He" "said" "hi" "NEAR" "x" "a" "b"'
    assert fts5_query("¿¡!?") is None
    assert fts5_query("Grüße 東京") == '"Grüße" "東京"'


# ── retention and deletion ──


async def test_purge_deletes_older_items_of_every_owner(storage: Storage) -> None:
    await fill(storage, ALICE, 10)
    await fill(storage, BOB, 10, with_jid=ALICE)
    cutoff = T0 + timedelta(seconds=4)
    assert await storage.archive.purge(older_than=cutoff) == 8
    page = await storage.archive.query(ALICE)
    assert page.first == "id000004" and page.count == 6
    assert (await storage.archive.query(BOB)).count == 6
    # Full text no longer finds what was purged, and still finds the rest.
    assert (await storage.archive.query(ALICE, text="number 3")).count == 0
    assert (await storage.archive.query(ALICE, text="number 5")).count == 1


async def test_purge_of_one_owner(storage: Storage) -> None:
    await fill(storage, ALICE, 10)
    await fill(storage, BOB, 10, with_jid=ALICE)
    assert await storage.archive.purge(BOB, older_than=T0 + timedelta(days=1)) == 10
    assert (await storage.archive.query(ALICE)).count == 10
    assert (await storage.archive.query(BOB)).count == 0


async def test_purge_works_in_batches(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "PURGE_BATCH", 7)
    await fill(storage, ALICE, 30)
    assert await storage.archive.purge(older_than=T0 + timedelta(seconds=21)) == 21
    assert (await storage.archive.query(ALICE)).first == "id000021"


async def test_purged_ids_are_not_reused(storage: Storage) -> None:
    first = await storage.archive.append(ALICE, "a", BOB, "out", T0, "<m/>")
    second = await storage.archive.append(ALICE, "b", BOB, "out", T0, "<m/>")
    await storage.archive.purge(older_than=T0 + timedelta(seconds=1))
    third = await storage.archive.append(ALICE, "c", BOB, "out", T0, "<m/>")
    assert first < second < third


async def test_delete_given_items_of_that_owner_only(storage: Storage) -> None:
    await fill(storage, ALICE, 5)
    await fill(storage, BOB, 5, with_jid=ALICE)
    assert await storage.archive.delete(ALICE, ["id000001", "id000003", "unknown"]) == 2
    assert [i.stanza_id for i in (await storage.archive.query(ALICE)).items] == [
        "id000000",
        "id000002",
        "id000004",
    ]
    assert (await storage.archive.query(BOB)).count == 5
    assert (await storage.archive.query(ALICE, text="number 3")).count == 0
    assert await storage.archive.delete(ALICE, []) == 0


# ── preferences ──


async def test_prefs_are_none_until_set_then_round_trip(storage: Storage) -> None:
    assert await storage.archive.get_prefs(ALICE) is None
    prefs = ArchivePrefs("roster", always=(BOB, f"{CAROL}/phone"), never=("spam@example.net",))
    await storage.archive.set_prefs(ALICE, prefs)
    assert await storage.archive.get_prefs(ALICE) == prefs
    await storage.archive.set_prefs(ALICE, ArchivePrefs("never"))
    assert await storage.archive.get_prefs(ALICE) == ArchivePrefs("never")
    assert await storage.archive.get_prefs(BOB) is None


def test_prefs_default_must_be_a_known_mode() -> None:
    with pytest.raises(ValueError, match="always/never/roster"):
        ArchivePrefs("sometimes")  # type: ignore[arg-type]


# ── accounts ──


async def test_deleting_the_account_deletes_its_archive_and_prefs(storage: Storage) -> None:
    await storage.accounts.create(ALICE, [])
    await fill(storage, ALICE, 20)
    await fill(storage, BOB, 5, with_jid=ALICE)
    await storage.archive.set_prefs(ALICE, ArchivePrefs("never"))
    await storage.archive.set_prefs(BOB, ArchivePrefs("always"))
    assert await storage.accounts.delete(ALICE)
    assert (await storage.archive.query(ALICE)).count == 0
    assert (await storage.archive.query(ALICE, text="number")).count == 0
    assert await storage.archive.get_prefs(ALICE) is None
    assert (await storage.archive.query(BOB)).count == 5
    assert await storage.archive.get_prefs(BOB) == ArchivePrefs("always")
