"""MAM query latency on a large archive, on SQLite and PostgreSQL.

``python -m bench.archive`` fills one account's archive with 100,000 messages (and other
accounts' archives with as many again, so the owner filter has work to do), then times pages
of 50 at the start, the middle and the end of it, a 'with' query and full-text queries:

* ``store``: ``storage.archive.query()`` alone, the database's share;
* ``iq``: the whole server side of a query (``Mam.on_query``): parsing the request, the
  database, and building and serialising the 50 result messages and the ``<fin/>``.

PostgreSQL comes from ``NATTER_TEST_POSTGRES_URL`` (an admin URL; default
``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``); the benchmark creates its own
database and drops it afterwards. ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
from sqlalchemy import make_url, text

from xmpp_server.jid import JID
from xmpp_server.modules.mam import COUNT_LIMIT, FULLTEXT_FIELD, NS_MAM, NS_RSM, Mam, MamOptions
from xmpp_server.stanza import make, qn
from xmpp_server.storage import ArchiveEntry, Storage
from xmpp_server.storage.migrations import upgrade
from xmpp_server.xml import Element, tobytes

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
DOMAIN = "bench.example"
OWNER = f"alice@{DOMAIN}"
PEERS = [f"peer{i}@{DOMAIN}" for i in range(20)]
WORDS = (
    "the a to and of you i it is that in we for on this be have are with not but at can so "
    "what do was will just me my get if your all about up out like know no time see go good "
    "now how think when meet call later today tomorrow tonight morning coffee lunch train "
    "office home weekend photo link thanks sorry great nice cool sure okay yes maybe soon"
).split()
RARE = "lighthouse"  # in one message of a thousand
BATCH = 10_000


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _body(rng: random.Random, i: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(3, 14))
    if i % 1000 == 500:
        words.insert(rng.randrange(len(words)), RARE)
    return " ".join(words)


def _entries(owner: str, n: int, start: datetime, seed: int) -> list[ArchiveEntry]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        peer = PEERS[i % len(PEERS)]
        body = _body(rng, i)
        incoming = rng.random() < 0.5
        frm, to = (f"{peer}/phone", owner) if incoming else (f"{owner}/laptop", peer)
        xml = (
            f"<message xmlns='jabber:client' from='{frm}' to='{to}' type='chat' id='m{i}'>"
            f"<body>{body}</body><origin-id xmlns='urn:xmpp:sid:0' id='o{seed}-{i}'/></message>"
        )
        out.append(
            ArchiveEntry(
                stanza_id=f"{seed:02d}{i:010d}",
                with_jid=f"{peer}/phone" if incoming else peer,
                direction="in" if incoming else "out",
                timestamp=start + timedelta(milliseconds=250 * i),
                xml=xml,
                body=body,
            )
        )
    return out


async def fill(storage: Storage, n: int, others: int) -> float:
    """The owner's archive and ``others`` other archives of n/others messages; rows/s."""
    start = datetime.now(UTC) - timedelta(days=30)
    jobs = [(OWNER, n, 0)] + [(f"user{k}@{DOMAIN}", n // others, k + 1) for k in range(others)]
    began, rows = time.perf_counter(), 0
    for owner, count, seed in jobs:
        entries = _entries(owner, count, start, seed)
        for i in range(0, len(entries), BATCH):
            await storage.archive.append_many(owner, entries[i : i + BATCH])
        rows += count
    elapsed = time.perf_counter() - began
    # What autovacuum does soon after a bulk load on PostgreSQL: statistics, the visibility
    # map for index-only counts, and the GIN index's pending list merged.
    async with storage.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        vacuum = "VACUUM ANALYZE" if storage.engine.dialect.name == "postgresql" else "ANALYZE"
        await connection.execute(text(vacuum))
    return rows / elapsed


class Sink:
    """A session that serialises what it is given, as the connection would."""

    def __init__(self) -> None:
        self.jid = JID.parse(f"{OWNER}/laptop")
        self.sent = 0

    def deliver(self, stanza: Element, *args: Any, **kwargs: Any) -> None:
        self.sent += len(tobytes(stanza))


def _iq(rsm: dict[str, str], fields: dict[str, str]) -> Element:
    iq = make("iq", type="set", id="q", from_=f"{OWNER}/laptop")
    query = ET.SubElement(iq, qn(NS_MAM, "query"), {"queryid": "bench"})
    if fields:
        form = ET.SubElement(query, "{jabber:x:data}x", {"type": "submit"})
        for var, value in {"FORM_TYPE": NS_MAM, **fields}.items():
            field = ET.SubElement(form, "{jabber:x:data}field", {"var": var})
            ET.SubElement(field, "{jabber:x:data}value").text = value
    rsm_set = ET.SubElement(query, qn(NS_RSM, "set"))
    for key, value in rsm.items():
        ET.SubElement(rsm_set, qn(NS_RSM, key)).text = value
    return iq


async def timed(run: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, float]:
    await run()  # warm caches and statement caches
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return statistics.median(samples), p99


async def measure(storage: Storage, n: int, repeat: int) -> list[tuple[str, str, float, float]]:
    middle_id = f"00{n // 2:010d}"
    host = SimpleNamespace(storage=storage, domain=DOMAIN)
    mam = Mam(cast(Any, host), MamOptions())
    sink = Sink()
    cases: list[tuple[str, dict[str, Any], dict[str, str], dict[str, str]]] = [
        ("start of archive", {}, {"max": "50"}, {}),
        ("middle (after)", {"after": middle_id}, {"max": "50", "after": middle_id}, {}),
        ("end (before='')", {"before": ""}, {"max": "50", "before": ""}, {}),
        (
            "with, middle",
            {"with_jid": PEERS[3], "after": middle_id},
            {"max": "50", "after": middle_id},
            {"with": PEERS[3]},
        ),
        (f"full text '{RARE}'", {"text": RARE}, {"max": "50"}, {FULLTEXT_FIELD: RARE}),
        ("full text 'coffee'", {"text": "coffee"}, {"max": "50"}, {FULLTEXT_FIELD: "coffee"}),
        (
            "full text 'coffee train', end",
            {"text": "coffee train", "before": ""},
            {"max": "50", "before": ""},
            {FULLTEXT_FIELD: "coffee train"},
        ),
    ]
    figures = []
    for name, kwargs, rsm, fields in cases:
        page = await storage.archive.query(OWNER, limit=50, **kwargs)
        assert page.items, name

        async def store_query(kwargs: dict[str, Any] = kwargs) -> None:
            await storage.archive.query(OWNER, limit=50, count_limit=COUNT_LIMIT, **kwargs)

        async def iq_query(rsm: dict[str, str] = rsm, fields: dict[str, str] = fields) -> None:
            await mam.on_query(cast(Any, sink), _iq(rsm, fields))

        p50, p99 = await timed(store_query, repeat)
        figures.append((name, "store", p50, p99))
        p50, p99 = await timed(iq_query, repeat)
        figures.append((name, "iq", p50, p99))
        _out(f"    {name:<30} {len(page.items):>3} items of {page.count}")

    async def exact_count() -> None:
        await storage.archive.query(OWNER, limit=50)

    async def exact_count_middle() -> None:
        await storage.archive.query(OWNER, limit=50, after=middle_id)

    for name, run in (
        ("start, exact count", exact_count),
        ("middle, exact count", exact_count_middle),
    ):
        p50, p99 = await timed(run, repeat)
        figures.append((name, "store", p50, p99))

    counter = iter(range(10**9))

    async def append() -> None:
        i = next(counter)
        await storage.archive.append(
            OWNER, f"new{i}", PEERS[0], "in", datetime.now(UTC), "<message/>", f"new {i}"
        )

    p50, p99 = await timed(append, repeat)
    figures.append(("append one message", "store", p50, p99))
    return figures


@asynccontextmanager
async def sqlite_database() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="natter-bench-") as tmp:
        yield f"sqlite+aiosqlite:///{Path(tmp) / 'bench.sqlite3'}"


@asynccontextmanager
async def postgres_database(admin_url: str) -> AsyncIterator[str]:
    admin = make_url(admin_url)
    plain = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"natter_bench_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(plain, timeout=10)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        connection = await asyncpg.connect(plain, timeout=10)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


async def run_backend(label: str, url: str, args: argparse.Namespace) -> None:
    await upgrade(url)
    async with await Storage.open(url) as storage:
        _out(f"{label}: filling {args.messages:,} messages for {OWNER} and as many for others")
        rate = await fill(storage, args.messages, args.others)
        _out(f"  inserted at {rate:,.0f} rows/s (executemany, batches of {BATCH:,})")
        figures = await measure(storage, args.messages, args.repeat)
    _out(f"  {'query (page of 50)':<30} {'level':<6} {'p50 ms':>8} {'p99 ms':>8}")
    for name, level, p50, p99 in figures:
        _out(f"  {name:<30} {level:<6} {p50:>8.2f} {p99:>8.2f}")
    _out()


async def main_async(args: argparse.Namespace) -> int:
    if args.backend in ("sqlite", "both"):
        async with sqlite_database() as url:
            await run_backend("SQLite", url, args)
    if args.backend in ("postgres", "both"):
        admin = args.postgres_url
        try:
            async with postgres_database(admin) as url:
                await run_backend("PostgreSQL", url, args)
        except (OSError, asyncpg.PostgresError) as exc:
            sys.stderr.write(f"bench: PostgreSQL at {admin} is not usable: {exc}\n")
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000, help="in the measured archive")
    parser.add_argument("--others", type=int, default=4, help="other archives sharing the rows")
    parser.add_argument("--repeat", type=int, default=200, help="timed runs per query")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("NATTER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="admin URL; a database is created and dropped there",
    )
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
