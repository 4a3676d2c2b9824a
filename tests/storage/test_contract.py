"""One contract for every store, run against every backend (Prosody's storagemanager spec)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from xmpp_server.credentials import ScramCredentials, derive_credentials
from xmpp_server.storage import (
    AccountExists,
    AccountNotFound,
    RosterItem,
    Storage,
)
from xmpp_server.storage.tables import user_tables

ALICE = "alice@example.org"
BOB = "bob@example.org"


def scram(mechanism: str, password: str = "secret") -> ScramCredentials:
    return derive_credentials(mechanism, password, 4096)


def both(password: str = "secret") -> list[ScramCredentials]:
    return [scram("SCRAM-SHA-1", password), scram("SCRAM-SHA-256", password)]


# ── accounts ──


async def test_create_account_then_it_exists(storage: Storage) -> None:
    assert not await storage.accounts.exists(ALICE)
    await storage.accounts.create(ALICE, both())
    assert await storage.accounts.exists(ALICE)
    assert not await storage.accounts.exists(BOB)


async def test_create_duplicate_account_raises_account_exists_and_keeps_credentials(
    storage: Storage,
) -> None:
    original = scram("SCRAM-SHA-256", "first")
    await storage.accounts.create(ALICE, [original])
    with pytest.raises(AccountExists):
        await storage.accounts.create(ALICE, [scram("SCRAM-SHA-256", "second")])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") == original


async def test_credentials_round_trip_exactly(storage: Storage) -> None:
    # Every byte value, including NUL and high bytes, and an iteration count past 2**16.
    odd = ScramCredentials(
        "SCRAM-SHA-1", bytes(range(256)), 1_000_000, b"\x00" * 20, b"\xff\x00\x80" * 7
    )
    sha256 = scram("SCRAM-SHA-256")
    await storage.accounts.create(ALICE, [odd, sha256])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-1") == odd
    got = await storage.accounts.credentials(ALICE, "SCRAM-SHA-256")
    assert got == sha256
    assert got is not None and type(got.salt) is bytes and type(got.stored_key) is bytes


async def test_credentials_of_unknown_user_or_mechanism_are_none(storage: Storage) -> None:
    await storage.accounts.create(ALICE, [scram("SCRAM-SHA-1")])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") is None
    assert await storage.accounts.credentials(BOB, "SCRAM-SHA-1") is None


async def test_account_without_credentials_can_be_created(storage: Storage) -> None:
    await storage.accounts.create(ALICE, [])
    info = await storage.accounts.info(ALICE)
    assert info is not None and info.mechanisms == ()


async def test_create_with_duplicate_mechanism_is_rejected_before_writing(
    storage: Storage,
) -> None:
    with pytest.raises(ValueError, match="duplicate SCRAM mechanism"):
        await storage.accounts.create(ALICE, [scram("SCRAM-SHA-1"), scram("SCRAM-SHA-1", "x")])
    assert not await storage.accounts.exists(ALICE)


async def test_set_credentials_replaces_every_mechanism(storage: Storage) -> None:
    await storage.accounts.create(ALICE, both("old"))
    new = scram("SCRAM-SHA-256", "new")
    await storage.accounts.set_credentials(ALICE, [new])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") == new
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-1") is None


async def test_set_credentials_of_unknown_user_raises_account_not_found(
    storage: Storage,
) -> None:
    with pytest.raises(AccountNotFound):
        await storage.accounts.set_credentials(ALICE, both())
    assert not await storage.accounts.exists(ALICE)


async def test_delete_unknown_account_returns_false(storage: Storage) -> None:
    assert await storage.accounts.delete(ALICE) is False


async def _fill(storage: Storage, user: str) -> None:
    await storage.rosters.put(user, RosterItem("carol@example.net", subscription="both"))
    await storage.subscriptions.add(user, "dave@example.net", "<presence type='subscribe'/>")
    await storage.vcards.set(user, "<vCard xmlns='vcard-temp'/>")
    await storage.last_activity.set(user, 1_700_000_000.0, "gone")
    await storage.blocklist.add(user, ["spam@example.com"])
    await storage.offline.push(user, "<message/>")


async def test_delete_account_removes_every_row_of_that_user_only(storage: Storage) -> None:
    for user in (ALICE, BOB):
        await storage.accounts.create(user, both())
        await _fill(storage, user)

    assert await storage.accounts.delete(ALICE) is True

    assert not await storage.accounts.exists(ALICE)
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-1") is None
    assert await storage.rosters.items(ALICE) == []
    assert await storage.rosters.version(ALICE) == 0
    assert await storage.subscriptions.list(ALICE) == []
    assert await storage.vcards.get(ALICE) is None
    assert await storage.last_activity.get(ALICE) is None
    assert await storage.blocklist.get(ALICE) == []
    assert await storage.offline.count(ALICE) == 0
    # Look underneath the API too, so a table added later cannot be forgotten.
    async with storage.sessions() as session:
        for table in user_tables():
            left = await session.scalar(
                select(func.count())
                .select_from(table)
                .where(table.domain == "example.org", table.username == "alice")
            )
            assert left == 0, table.__name__

    assert await storage.accounts.exists(BOB)
    assert await storage.accounts.credentials(BOB, "SCRAM-SHA-1") is not None
    assert len(await storage.rosters.items(BOB)) == 1
    assert await storage.offline.count(BOB) == 1
    assert await storage.blocklist.get(BOB) == ["spam@example.com"]


async def test_deleted_account_can_be_created_again_clean(storage: Storage) -> None:
    await storage.accounts.create(ALICE, both("old"))
    await storage.accounts.delete(ALICE)
    new = scram("SCRAM-SHA-256", "new")
    await storage.accounts.create(ALICE, [new])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") == new
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-1") is None


async def test_list_accounts_is_sorted_and_per_domain(storage: Storage) -> None:
    for user in ("zoe@example.org", "Ärger@example.org", "bob@example.org", "adam@other.net"):
        await storage.accounts.create(user, [])
    assert await storage.accounts.list("example.org") == sorted(
        ["zoe@example.org", "Ärger@example.org", "bob@example.org"]
    )
    assert await storage.accounts.list("other.net") == ["adam@other.net"]
    assert await storage.accounts.list("nowhere.example") == []


async def test_same_username_on_two_domains_are_two_accounts(storage: Storage) -> None:
    await storage.accounts.create("alice@a.example", [scram("SCRAM-SHA-1")])
    await storage.accounts.create("alice@b.example", [])
    assert await storage.accounts.credentials("alice@b.example", "SCRAM-SHA-1") is None
    await storage.accounts.delete("alice@a.example")
    assert await storage.accounts.exists("alice@b.example")


async def test_account_info(storage: Storage) -> None:
    before = datetime.now(UTC)
    await storage.accounts.create(ALICE, list(reversed(both())))
    info = await storage.accounts.info(ALICE)
    assert info is not None
    assert info.user == ALICE
    assert info.mechanisms == ("SCRAM-SHA-1", "SCRAM-SHA-256")
    assert info.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= info.created_at <= datetime.now(UTC)
    assert await storage.accounts.info(BOB) is None


@pytest.mark.parametrize("user", ["alice", "alice@", "@example.org", "alice@example.org/phone"])
async def test_users_must_be_bare_jids(storage: Storage, user: str) -> None:
    with pytest.raises(ValueError, match="not a bare user JID"):
        await storage.accounts.exists(user)


# ── rosters ──


async def test_empty_roster(storage: Storage) -> None:
    assert await storage.rosters.items(ALICE) == []
    assert await storage.rosters.get(ALICE, BOB) is None
    assert await storage.rosters.version(ALICE) == 0


async def test_roster_item_round_trips_every_field(storage: Storage) -> None:
    item = RosterItem(
        BOB,
        name="Bob ☃ «B»",
        subscription="from",
        ask=True,
        approved=True,
        groups=("Work", "Friends", "Ünïcode"),
    )
    assert await storage.rosters.put(ALICE, item) == 1
    assert await storage.rosters.get(ALICE, BOB) == item
    assert await storage.rosters.items(ALICE) == [item]


async def test_roster_item_defaults_round_trip(storage: Storage) -> None:
    await storage.rosters.put(ALICE, RosterItem(BOB))
    assert await storage.rosters.get(ALICE, BOB) == RosterItem(BOB)


async def test_roster_put_replaces_and_bumps_version_each_time(storage: Storage) -> None:
    assert await storage.rosters.put(ALICE, RosterItem(BOB, groups=("A",))) == 1
    assert await storage.rosters.put(ALICE, RosterItem(BOB, name="Bob")) == 2
    assert await storage.rosters.put(ALICE, RosterItem(BOB, name="Bob")) == 3
    assert await storage.rosters.items(ALICE) == [RosterItem(BOB, name="Bob")]
    assert await storage.rosters.version(ALICE) == 3


async def test_roster_items_are_ordered_by_jid(storage: Storage) -> None:
    jids = ["zed@example.org", "amy@example.net", "Ämy@example.net", "bob@example.org", "b.example"]
    for jid in jids:
        await storage.rosters.put(ALICE, RosterItem(jid))
    assert [item.jid for item in await storage.rosters.items(ALICE)] == sorted(jids)


async def test_roster_remove_returns_new_version(storage: Storage) -> None:
    await storage.rosters.put(ALICE, RosterItem(BOB))
    await storage.rosters.put(ALICE, RosterItem("carol@example.org"))
    assert await storage.rosters.remove(ALICE, BOB) == 3
    assert await storage.rosters.get(ALICE, BOB) is None
    assert [i.jid for i in await storage.rosters.items(ALICE)] == ["carol@example.org"]


async def test_roster_remove_of_absent_item_is_none_and_keeps_version(storage: Storage) -> None:
    assert await storage.rosters.remove(ALICE, BOB) is None
    assert await storage.rosters.version(ALICE) == 0
    await storage.rosters.put(ALICE, RosterItem(BOB))
    assert await storage.rosters.remove(ALICE, "nobody@example.org") is None
    assert await storage.rosters.version(ALICE) == 1


async def test_rosters_and_versions_are_per_user(storage: Storage) -> None:
    await storage.rosters.put(ALICE, RosterItem(BOB))
    await storage.rosters.put(ALICE, RosterItem("carol@example.org"))
    assert await storage.rosters.put(BOB, RosterItem(ALICE)) == 1
    assert await storage.rosters.version(ALICE) == 2
    assert await storage.rosters.items(BOB) == [RosterItem(ALICE)]


async def test_concurrent_roster_changes_get_distinct_versions(storage: Storage) -> None:
    versions = await asyncio.gather(
        *(storage.rosters.put(ALICE, RosterItem(f"c{i}@example.org")) for i in range(8))
    )
    assert sorted(versions) == list(range(1, 9))
    assert await storage.rosters.version(ALICE) == 8


def test_roster_item_rejects_unknown_subscription() -> None:
    with pytest.raises(ValueError, match="subscription"):
        RosterItem(BOB, subscription="pending")


# ── pending subscription requests ──


async def test_pending_subscriptions_in_order_of_arrival(storage: Storage) -> None:
    assert await storage.subscriptions.list(ALICE) == []
    await storage.subscriptions.add(ALICE, "zed@example.org", "<presence id='1'/>")
    await storage.subscriptions.add(ALICE, "amy@example.org", "<presence id='2'/>")
    assert await storage.subscriptions.list(ALICE) == [
        ("zed@example.org", "<presence id='1'/>"),
        ("amy@example.org", "<presence id='2'/>"),
    ]
    assert await storage.subscriptions.list(BOB) == []


async def test_pending_subscription_is_replaced_and_becomes_newest(storage: Storage) -> None:
    await storage.subscriptions.add(ALICE, "zed@example.org", "<presence id='1'/>")
    await storage.subscriptions.add(ALICE, "amy@example.org", "<presence id='2'/>")
    await storage.subscriptions.add(ALICE, "zed@example.org", "<presence id='3'/>")
    assert await storage.subscriptions.list(ALICE) == [
        ("amy@example.org", "<presence id='2'/>"),
        ("zed@example.org", "<presence id='3'/>"),
    ]


async def test_pending_subscription_remove(storage: Storage) -> None:
    await storage.subscriptions.add(ALICE, BOB, "<presence/>")
    await storage.subscriptions.add(BOB, "carol@example.org", "<presence/>")
    assert await storage.subscriptions.remove(ALICE, BOB) is True
    assert await storage.subscriptions.remove(ALICE, BOB) is False
    assert await storage.subscriptions.list(ALICE) == []
    assert await storage.subscriptions.list(BOB) == [("carol@example.org", "<presence/>")]


# ── vCards ──


async def test_vcard_set_get_replace_delete(storage: Storage) -> None:
    assert await storage.vcards.get(ALICE) is None
    big = "<vCard xmlns='vcard-temp'><FN>Ålice ☃</FN><PHOTO>" + "A" * 200_000 + "</PHOTO></vCard>"
    await storage.vcards.set(ALICE, big)
    assert await storage.vcards.get(ALICE) == big
    await storage.vcards.set(ALICE, "<vCard xmlns='vcard-temp'/>")
    assert await storage.vcards.get(ALICE) == "<vCard xmlns='vcard-temp'/>"
    assert await storage.vcards.get(BOB) is None
    await storage.vcards.set(ALICE, None)
    assert await storage.vcards.get(ALICE) is None
    await storage.vcards.set(ALICE, None)  # deleting nothing is fine


# ── last activity ──


async def test_last_activity_set_get_overwrite(storage: Storage) -> None:
    assert await storage.last_activity.get(ALICE) is None
    await storage.last_activity.set(ALICE, 1_700_000_000.25, "Gone fishing ☃")
    assert await storage.last_activity.get(ALICE) == (1_700_000_000.25, "Gone fishing ☃")
    await storage.last_activity.set(ALICE, 1_700_000_100.123456, "")
    got = await storage.last_activity.get(ALICE)
    assert got is not None
    assert got[0] == pytest.approx(1_700_000_100.123456, abs=1e-6)
    assert got[1] == ""
    assert await storage.last_activity.get(BOB) is None


# ── blocklist ──


async def test_blocklist_add_is_idempotent_and_sorted(storage: Storage) -> None:
    assert await storage.blocklist.get(ALICE) == []
    await storage.blocklist.add(ALICE, ["zed@example.org", "spam.example", "zed@example.org"])
    await storage.blocklist.add(ALICE, ["spam.example", "amy@example.org"])
    await storage.blocklist.add(ALICE, [])
    assert await storage.blocklist.get(ALICE) == [
        "amy@example.org",
        "spam.example",
        "zed@example.org",
    ]
    assert await storage.blocklist.get(BOB) == []


async def test_blocklist_remove_and_clear(storage: Storage) -> None:
    await storage.blocklist.add(ALICE, ["a@example.org", "b@example.org", "c@example.org"])
    await storage.blocklist.add(BOB, ["a@example.org"])
    await storage.blocklist.remove(ALICE, ["a@example.org", "not-blocked@example.org"])
    await storage.blocklist.remove(ALICE, [])
    assert await storage.blocklist.get(ALICE) == ["b@example.org", "c@example.org"]
    await storage.blocklist.clear(ALICE)
    assert await storage.blocklist.get(ALICE) == []
    await storage.blocklist.clear(ALICE)
    assert await storage.blocklist.get(BOB) == ["a@example.org"]


# ── offline messages ──


async def test_offline_messages_come_back_oldest_first(storage: Storage) -> None:
    ids = [await storage.offline.push(ALICE, f"<message id='{n}'/>") for n in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert await storage.offline.fetch(ALICE) == [
        (ids[n], f"<message id='{n}'/>") for n in range(5)
    ]
    assert await storage.offline.fetch(ALICE, limit=2) == [
        (ids[0], "<message id='0'/>"),
        (ids[1], "<message id='1'/>"),
    ]
    assert await storage.offline.count(ALICE) == 5
    assert await storage.offline.fetch(BOB) == []
    assert await storage.offline.count(BOB) == 0


async def test_offline_delete_only_given_ids_of_that_user(storage: Storage) -> None:
    a1 = await storage.offline.push(ALICE, "<a1/>")
    b1 = await storage.offline.push(BOB, "<b1/>")
    a2 = await storage.offline.push(ALICE, "<a2/>")
    a3 = await storage.offline.push(ALICE, "<a3/>")
    await storage.offline.delete(ALICE, [a1, a3, b1])  # b1 is not Alice's to delete
    await storage.offline.delete(ALICE, [])
    assert await storage.offline.fetch(ALICE) == [(a2, "<a2/>")]
    assert await storage.offline.fetch(BOB) == [(b1, "<b1/>")]
    assert await storage.offline.count(ALICE) == 1


async def test_offline_ids_keep_growing_after_the_newest_is_deleted(storage: Storage) -> None:
    # SQLite reuses the highest rowid unless the table is AUTOINCREMENT.
    first = await storage.offline.push(ALICE, "<m1/>")
    second = await storage.offline.push(ALICE, "<m2/>")
    await storage.offline.delete(ALICE, [first, second])
    assert await storage.offline.push(ALICE, "<m3/>") > second


async def test_concurrent_identical_subscription_requests_store_one(storage: Storage) -> None:
    await asyncio.gather(
        *(storage.subscriptions.add(ALICE, BOB, f"<presence id='{n}'/>") for n in range(6))
    )
    [(contact, _stanza)] = await storage.subscriptions.list(ALICE)
    assert contact == BOB
