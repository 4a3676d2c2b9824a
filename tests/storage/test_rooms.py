"""The MUC room store's contract (XEP-0045 rooms, subjects, affiliations), on every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, inspect, select, text

from xmpp_server.storage import Affiliation, RoomNotFound, Storage, StoredRoom
from xmpp_server.storage.migrations import alembic_config, upgrade
from xmpp_server.storage.tables import MucAffiliation, MucRoom, user_tables

ROOM = "team@conference.example.org"
OTHER = "lobby@conference.example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.net"

CONFIG: dict[str, Any] = {"muc#roomconfig_roomname": "Team", "muc#roomconfig_persistentroom": True}


# ── rooms ──


async def test_create_then_get(storage: Storage) -> None:
    assert await storage.rooms.get(ROOM) is None
    before = datetime.now(UTC)
    assert await storage.rooms.create(ROOM, CONFIG) is True
    room = await storage.rooms.get(ROOM)
    assert room is not None
    assert (room.jid, room.config, room.subject, room.subject_by) == (ROOM, CONFIG, None, None)
    assert room.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= room.created_at <= datetime.now(UTC)
    assert await storage.rooms.get(OTHER) is None


async def test_create_twice_returns_false_and_keeps_the_first_config(storage: Storage) -> None:
    assert await storage.rooms.create(ROOM, {"v": 1})
    first = await storage.rooms.get(ROOM)
    assert await storage.rooms.create(ROOM, {"v": 2}) is False
    assert await storage.rooms.get(ROOM) == first


async def test_concurrent_creates_of_one_room_have_one_winner(storage: Storage) -> None:
    results = await asyncio.gather(*(storage.rooms.create(ROOM, {"n": n}) for n in range(6)))
    assert sorted(results) == [False] * 5 + [True]
    assert [room.jid for room in await storage.rooms.list()] == [ROOM]


async def test_list_is_sorted_and_filters_on_the_service(storage: Storage) -> None:
    jids = [
        "zoo@conference.example.org",
        "Ärger@conference.example.org",
        "alpha@conference.example.org",
        "beta@muc.example.net",
        "x@example.org",  # a service whose name is a suffix of another's
    ]
    for jid in jids:
        await storage.rooms.create(jid, {})
    assert [room.jid for room in await storage.rooms.list()] == sorted(jids)
    assert [room.jid for room in await storage.rooms.list("conference.example.org")] == sorted(
        jids[:3]
    )
    assert [room.jid for room in await storage.rooms.list("example.org")] == ["x@example.org"]
    assert await storage.rooms.list("nowhere.example") == []
    listed = await storage.rooms.list("muc.example.net")
    assert listed == [await storage.rooms.get("beta@muc.example.net")]


async def test_empty_list(storage: Storage) -> None:
    assert await storage.rooms.list() == []


async def test_save_config_round_trips_nested_json(storage: Storage) -> None:
    config: dict[str, Any] = {
        "muc#roomconfig_roomname": "Ünïcode ☃ «Team» 😀",
        "muc#roomconfig_roomdesc": "",
        "muc#roomconfig_maxusers": 0,
        "big": 2**62 + 1,
        "ratio": 0.25,
        "muc#roomconfig_moderatedroom": False,
        "muc#roomconfig_membersonly": True,
        "muc#roomconfig_roomowners": [ALICE, BOB],
        "muc#roomconfig_presencebroadcast": ["moderator", "participant", "visitor"],
        "nested": {"a": [1, [2, {"b": None}], {}], "empty": [], "ключ": {"x": True}},
        "nothing": None,
    }
    await storage.rooms.save_config(ROOM, config)
    room = await storage.rooms.get(ROOM)
    assert room is not None and room.config == config
    assert type(room.config["big"]) is int and type(room.config["ratio"]) is float
    # A save replaces the whole configuration; keys left out are gone.
    await storage.rooms.save_config(ROOM, {"muc#roomconfig_roomname": "Renamed"})
    room = await storage.rooms.get(ROOM)
    assert room is not None and room.config == {"muc#roomconfig_roomname": "Renamed"}


async def test_save_config_creates_a_missing_room_and_keeps_subject_and_age(
    storage: Storage,
) -> None:
    await storage.rooms.save_config(ROOM, {"v": 1})
    await storage.rooms.set_subject(ROOM, "Plans", "alice")
    created = await storage.rooms.get(ROOM)
    assert created is not None
    await storage.rooms.save_config(ROOM, {"v": 2})
    assert await storage.rooms.get(ROOM) == StoredRoom(
        ROOM, {"v": 2}, "Plans", "alice", created.created_at
    )
    assert await storage.rooms.create(ROOM, {"v": 3}) is False


async def test_set_and_clear_the_subject(storage: Storage) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.create(OTHER, CONFIG)
    await storage.rooms.set_subject(ROOM, "Ünïcode subject ☃\nsecond line", "Alice ☃")
    room = await storage.rooms.get(ROOM)
    assert room is not None
    assert (room.subject, room.subject_by) == ("Ünïcode subject ☃\nsecond line", "Alice ☃")
    assert room.config == CONFIG
    other = await storage.rooms.get(OTHER)
    assert other is not None and other.subject is None
    await storage.rooms.set_subject(ROOM, None, None)
    room = await storage.rooms.get(ROOM)
    assert room is not None and (room.subject, room.subject_by) == (None, None)


async def test_set_subject_of_a_missing_room_raises_room_not_found(storage: Storage) -> None:
    with pytest.raises(RoomNotFound, match=f"no room {ROOM}"):
        await storage.rooms.set_subject(ROOM, "lost", "alice")
    assert await storage.rooms.get(ROOM) is None


@pytest.mark.parametrize(
    "jid", ["conference.example.org", "@conference.example.org", "team@", "team@muc/res"]
)
async def test_rooms_need_a_bare_room_jid(storage: Storage, jid: str) -> None:
    with pytest.raises(ValueError, match="not a bare room JID"):
        await storage.rooms.create(jid, {})
    with pytest.raises(ValueError, match="not a bare room JID"):
        await storage.rooms.save_config(jid, {})
    assert await storage.rooms.list() == []


async def test_delete_room(storage: Storage) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.create(OTHER, CONFIG)
    assert await storage.rooms.delete(ROOM) is True
    assert await storage.rooms.get(ROOM) is None
    assert await storage.rooms.delete(ROOM) is False
    assert [room.jid for room in await storage.rooms.list()] == [OTHER]


# ── affiliations ──


async def test_affiliations_upsert_replace_remove_and_sort(storage: Storage) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    assert await storage.rooms.affiliations(ROOM) == []
    await storage.rooms.set_affiliation(ROOM, Affiliation(BOB, "member", nick="bobby"))
    await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
    await storage.rooms.set_affiliation(ROOM, Affiliation("spam.example", "outcast", reason="☃"))
    await storage.rooms.set_affiliation(ROOM, Affiliation(CAROL, "member"))
    await storage.rooms.set_affiliation(ROOM, Affiliation("dave@example.org", "admin"))
    assert await storage.rooms.affiliations(ROOM) == [
        Affiliation("dave@example.org", "admin"),
        Affiliation(BOB, "member", nick="bobby"),
        Affiliation(CAROL, "member"),
        Affiliation("spam.example", "outcast", reason="☃"),
        Affiliation(ALICE, "owner"),
    ]

    # Replacing takes every field from the new item: a nick left out is no longer reserved.
    await storage.rooms.set_affiliation(ROOM, Affiliation(BOB, "admin", reason="promoted"))
    await storage.rooms.set_affiliation(ROOM, Affiliation(CAROL, "none"))
    await storage.rooms.set_affiliation(ROOM, Affiliation("nobody@example.org", "none"))
    assert await storage.rooms.affiliations(ROOM) == [
        Affiliation(BOB, "admin", reason="promoted"),
        Affiliation("dave@example.org", "admin"),
        Affiliation("spam.example", "outcast", reason="☃"),
        Affiliation(ALICE, "owner"),
    ]


async def test_affiliations_are_per_room(storage: Storage) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.create(OTHER, CONFIG)
    await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
    await storage.rooms.set_affiliation(OTHER, Affiliation(ALICE, "outcast"))
    await storage.rooms.set_affiliation(OTHER, Affiliation(ALICE, "none"))
    assert await storage.rooms.affiliations(ROOM) == [Affiliation(ALICE, "owner")]
    assert await storage.rooms.affiliations(OTHER) == []
    assert await storage.rooms.affiliations("missing@conference.example.org") == []


async def test_set_affiliations_applies_a_batch_in_order(storage: Storage) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.set_affiliation(ROOM, Affiliation(CAROL, "member"))
    await storage.rooms.set_affiliations(
        ROOM,
        [
            Affiliation(ALICE, "owner"),
            Affiliation(BOB, "member", nick="bob"),
            Affiliation(CAROL, "none"),
            Affiliation(BOB, "admin"),  # the same JID twice: the later item wins
            Affiliation("dave@example.org", "outcast"),
            Affiliation("dave@example.org", "none"),
        ],
    )
    assert await storage.rooms.affiliations(ROOM) == [
        Affiliation(BOB, "admin"),
        Affiliation(ALICE, "owner"),
    ]
    await storage.rooms.set_affiliations(ROOM, [])
    assert len(await storage.rooms.affiliations(ROOM)) == 2


@pytest.mark.parametrize(
    "bad",
    [
        Affiliation(CAROL, "moderator"),  # a role, not an affiliation
        Affiliation(CAROL, "Owner"),
        Affiliation(CAROL, ""),
        Affiliation(f"{CAROL}/phone", "member"),  # affiliations are for bare JIDs
        Affiliation("", "member"),
    ],
    ids=["role", "case", "empty", "full-jid", "no-jid"],
)
async def test_an_invalid_item_applies_none_of_the_batch(
    storage: Storage, bad: Affiliation
) -> None:
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.set_affiliation(ROOM, Affiliation(BOB, "member"))
    before = await storage.rooms.affiliations(ROOM)
    with pytest.raises(ValueError):
        await storage.rooms.set_affiliations(
            ROOM, [Affiliation(ALICE, "owner"), Affiliation(BOB, "none"), bad]
        )
    assert await storage.rooms.affiliations(ROOM) == before
    with pytest.raises(ValueError):
        await storage.rooms.set_affiliation(ROOM, bad)
    assert await storage.rooms.affiliations(ROOM) == before


async def test_affiliation_of_a_missing_room_raises_room_not_found(storage: Storage) -> None:
    with pytest.raises(RoomNotFound, match=f"^no room {ROOM}$") as caught:
        await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
    assert isinstance(caught.value, LookupError) and caught.value.room == ROOM
    with pytest.raises(RoomNotFound):
        await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "none"))
    with pytest.raises(RoomNotFound):
        await storage.rooms.set_affiliations(ROOM, [Affiliation(ALICE, "owner")])
    assert await storage.rooms.get(ROOM) is None
    assert await storage.rooms.rooms_of(ALICE) == []


async def test_rooms_of_a_user(storage: Storage) -> None:
    rooms = ["zoo@conference.example.org", "alpha@muc.example.net", ROOM]
    for room in rooms:
        await storage.rooms.create(room, {})
    await storage.rooms.set_affiliation(rooms[0], Affiliation(ALICE, "owner"))
    await storage.rooms.set_affiliation(rooms[1], Affiliation(ALICE, "outcast"))
    await storage.rooms.set_affiliation(rooms[2], Affiliation(ALICE, "member"))
    await storage.rooms.set_affiliation(rooms[2], Affiliation(BOB, "admin"))
    assert await storage.rooms.rooms_of(ALICE) == [
        ("alpha@muc.example.net", "outcast"),
        (ROOM, "member"),
        ("zoo@conference.example.org", "owner"),
    ]
    assert await storage.rooms.rooms_of(BOB) == [(ROOM, "admin")]
    assert await storage.rooms.rooms_of(CAROL) == []


async def test_delete_removes_the_affiliations_and_a_new_room_starts_clean(
    storage: Storage,
) -> None:
    await storage.rooms.create(ROOM, {"v": 1})
    await storage.rooms.create(OTHER, {})
    await storage.rooms.set_subject(ROOM, "old", "alice")
    await storage.rooms.set_affiliations(
        ROOM, [Affiliation(ALICE, "owner"), Affiliation(BOB, "member", nick="bob")]
    )
    await storage.rooms.set_affiliation(OTHER, Affiliation(ALICE, "member"))

    assert await storage.rooms.delete(ROOM) is True
    assert await storage.rooms.affiliations(ROOM) == []
    assert await storage.rooms.rooms_of(ALICE) == [(OTHER, "member")]
    assert await storage.rooms.rooms_of(BOB) == []
    async with storage.sessions() as session:
        left = await session.scalars(select(MucAffiliation.jid).where(MucAffiliation.room == ROOM))
        assert list(left) == []  # underneath the API too

    assert await storage.rooms.create(ROOM, {"v": 2}) is True
    room = await storage.rooms.get(ROOM)
    assert room is not None
    assert (room.config, room.subject, room.subject_by) == ({"v": 2}, None, None)
    assert await storage.rooms.affiliations(ROOM) == []
    assert await storage.rooms.affiliations(OTHER) == [Affiliation(ALICE, "member")]


async def test_the_database_cascades_a_room_delete_too(storage: Storage) -> None:
    # Whatever deletes a room row outside the store (an operator's SQL) takes its affiliations.
    await storage.rooms.create(ROOM, {})
    await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
    async with storage.engine.begin() as connection:
        await connection.execute(text("DELETE FROM muc_rooms WHERE jid = :jid"), {"jid": ROOM})
    assert await storage.rooms.rooms_of(ALICE) == []


async def test_deleting_an_account_leaves_its_rooms(storage: Storage) -> None:
    per_user = {table.__name__ for table in user_tables()}
    assert MucRoom.__name__ not in per_user and MucAffiliation.__name__ not in per_user
    await storage.accounts.create(ALICE, [])
    await storage.rooms.create(ROOM, CONFIG)
    await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
    await storage.accounts.delete(ALICE)
    assert await storage.rooms.get(ROOM) is not None
    assert await storage.rooms.rooms_of(ALICE) == [(ROOM, "owner")]


# ── migration ──


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_downgrade_to_0002_drops_the_room_tables(db_url: str) -> None:
    await upgrade(db_url)
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "0002")
    async with await Storage.open(db_url, require_migrated=False) as storage:
        async with storage.engine.connect() as connection:
            tables = await connection.run_sync(_tables)
        assert "archive" in tables
        assert not {"muc_rooms", "muc_affiliations"} & tables
    await upgrade(db_url)
    async with await Storage.open(db_url) as storage:
        assert await storage.rooms.create(ROOM, CONFIG) is True
        await storage.rooms.set_affiliation(ROOM, Affiliation(ALICE, "owner"))
        assert await storage.rooms.rooms_of(ALICE) == [(ROOM, "owner")]
