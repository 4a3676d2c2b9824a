"""The reads a login makes in one go agree with the stores they stand in for, on every backend."""

from __future__ import annotations

import asyncio

from xmpp_server.credentials import derive_credentials
from xmpp_server.storage import RosterItem, Storage

ALICE = "alice@example.org"
BOB = "bob@example.org"


async def test_initial_presence_reads_roster_requests_and_queue(storage: Storage) -> None:
    await storage.rosters.put(ALICE, RosterItem(BOB, name="Bob", subscription="both"))
    await storage.rosters.put(ALICE, RosterItem("carol@example.org", ask=True, groups=("G",)))
    await storage.subscriptions.add(ALICE, "dave@example.org", "<presence type='subscribe'/>")
    first = await storage.offline.push(ALICE, "<message id='1'/>")
    second = await storage.offline.push(ALICE, "<message id='2'/>")
    await storage.offline.push(BOB, "<message id='3'/>")

    state = await storage.initial_presence(ALICE, offline=True)

    assert state.roster == await storage.rosters.items(ALICE)
    assert state.pending == await storage.subscriptions.list(ALICE)
    assert state.offline == [(first, "<message id='1'/>"), (second, "<message id='2'/>")]
    without = await storage.initial_presence(ALICE, offline=False)
    assert without.offline == [] and without.roster == state.roster


async def test_initial_presence_of_a_user_with_nothing_stored(storage: Storage) -> None:
    state = await storage.initial_presence(ALICE, offline=True)
    assert (state.roster, state.pending, state.offline) == ([], [], [])


async def test_roster_snapshot_skips_the_items_the_client_has(storage: Storage) -> None:
    assert await storage.rosters.snapshot(ALICE, None) == (0, [])
    version = await storage.rosters.put(ALICE, RosterItem(BOB))
    assert await storage.rosters.snapshot(ALICE, "0") == (version, [RosterItem(BOB)])
    assert await storage.rosters.snapshot(ALICE, str(version)) == (version, None)


async def test_changed_password_is_read_at_the_next_lookup(storage: Storage) -> None:
    """Nothing caches credentials: a change by another process counts at once."""
    old = derive_credentials("SCRAM-SHA-256", "old", 4096)
    new = derive_credentials("SCRAM-SHA-256", "new", 4096)
    await storage.accounts.create(ALICE, [old])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") == old
    await storage.accounts.set_credentials(ALICE, [new])
    assert await storage.accounts.credentials(ALICE, "SCRAM-SHA-256") == new


async def test_concurrent_reads_all_complete(storage: Storage) -> None:
    """Many logins at once queue for SQLite's one connection without failing."""
    await storage.rosters.put(ALICE, RosterItem(BOB))
    states, rosters = await asyncio.gather(
        asyncio.gather(*(storage.initial_presence(ALICE, offline=True) for _ in range(50))),
        asyncio.gather(*(storage.rosters.items(ALICE) for _ in range(50))),
    )
    assert all(state.roster == [RosterItem(BOB)] for state in states)
    assert all(roster == [RosterItem(BOB)] for roster in rosters)
    await storage.last_activity.set(ALICE, 1_700_000_000.5, "away")
    assert await storage.last_activity.get(ALICE) == (1_700_000_000.5, "away")
