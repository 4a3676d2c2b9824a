"""Session fuzzer (issue 13): real client traffic, mutated, against a running natterd.

A legal session over direct TLS (stream header, SASL PLAIN, bind, presence, message, iq,
XEP-0198) is recorded as the chunks a client sends, each with the answer it waits for. A case
sends the first chunks as they are, so the damage lands before authentication, between
authentication and binding, or in a bound session; then the rest, with bytes flipped, cut,
deleted, spliced from elsewhere in the session or with junk put in; then ends the connection
one of several ways. After every case:

* a healthy client that stays logged in all along is still served (a ping is answered);
* the victim's connection is gone and no session of its account is left bound;
* nothing was logged at ERROR or above (no "Unhandled exception in client_connected_cb",
  no "connection failed" traceback).

One natterd (SQLite) serves every case; it runs on an event loop in a thread of its own, so
Hypothesis drives plain functions. A case costs tens of milliseconds (a TLS handshake and a
login), hence the weight given to ``fuzz_budget``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.e2e.harness import DOMAIN, add_user
from tests.e2e.wire import Wire, bind_request, header, plain_auth
from tests.fuzz.stats import fuzz_budget
from xmpp_server.config import build_config
from xmpp_server.jid import JID
from xmpp_server.server import Server

T = TypeVar("T")
VICTIM = f"bob@{DOMAIN}"
STEP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Step:
    """What a client sends, and a marker of the answer it waits for before the next step."""

    data: bytes
    answer: bytes | None
    authenticated: bool  # the stream is authenticated once this step is answered


SESSION: tuple[Step, ...] = (
    Step(header(), b"</stream:features>", False),
    Step(plain_auth("bob", "correct horse"), b"</success>", True),
    Step(header(), b"</stream:features>", True),
    Step(bind_request("fuzz"), b"</iq>", True),
    Step(b"<presence><priority>1</priority></presence>", None, True),
    Step(b"<enable xmlns='urn:xmpp:sm:3'/>", b"<enabled", True),
    Step(
        b"<message to='alice@localhost' type='chat' id='m1'><body>hi &amp; bye</body></message>",
        None,
        True,
    ),
    Step(b"<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>", b"p1", True),
    Step(b"<r xmlns='urn:xmpp:sm:3'/>", b"<a xmlns", True),
    Step(b"<a xmlns='urn:xmpp:sm:3' h='0'/>", None, True),
    Step(b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>", b"r1", True),
    Step(b"<presence type='unavailable'/>", None, True),
    Step(b"</stream:stream>", None, True),
)

# Pieces that have broken XMPP servers before (and this one: the ghost session).
JUNK = [
    b"<",
    b">",
    b"</x>",
    b"abc",
    b"<presence/>abc</x>",
    b"<?xml version='1.0'?>",
    b"<!-- c -->",
    b"<!DOCTYPE x>",
    b"&",
    b"&xxe;",
    b"]]>",
    b"<![CDATA[x]]>",
    b"\x00",
    b"\xff\xfe",
    b"\xc3",
    b"<x xmlns='urn:a}b'/>",
    b"<a xmlns='urn:xmpp:sm:3' h='99'/>",
    b"<a xmlns='urn:xmpp:sm:3' h='-1'/>",
    b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>",
    b"<resume xmlns='urn:xmpp:sm:3' previd='x' h='0'/>",
    b"<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
    b"<iq type='result' to='alice@localhost/desk'/>",
    b"<message to='bob@localhost/fuzz'><body>loop</body></message>",
    b"</stream:stream>",
    b"<stream:stream>",
    b" " * 100,
]


@st.composite
def mutations(draw: st.DrawFn, tail: bytes) -> bytes:
    """``tail`` after one to four mutations."""
    data = bytearray(tail)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "delete", "insert", "splice"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "insert":
            junk = draw(st.one_of(st.sampled_from(JUNK), st.binary(min_size=1, max_size=16)))
            data[pos:pos] = junk
        elif kind == "splice":
            # A chunk of this session where it does not belong (a stanza before auth...).
            data[pos:pos] = draw(st.sampled_from(SESSION)).data
    return bytes(data)


@dataclass(frozen=True)
class Case:
    prefix: int  # steps sent untouched, each waiting for its answer
    tail: bytes  # the mutated rest
    ending: str  # how the client ends the connection afterwards


@st.composite
def cases(draw: st.DrawFn) -> Case:
    prefix = draw(st.integers(0, len(SESSION) - 1))
    tail = b"".join(step.data for step in SESSION[prefix:])
    return Case(
        prefix,
        draw(mutations(tail)),
        draw(st.sampled_from(["close", "reset", "wait-for-server"])),
    )


class ErrorLog(logging.Handler):
    """Every record at ERROR or above, from any logger (asyncio's included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        found = [f"{r.name}: {r.getMessage()}" for r in self.records]
        self.records.clear()
        return found


class Natterd:
    """A natterd on an event loop in its own thread, with Alice logged in throughout."""

    def __init__(self, db_path: Path, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.db_path = db_path
        self.data_dir = data_dir
        self.server: Server | None = None
        self.alice: Wire | None = None
        self.pings = 0
        self.errors = ErrorLog()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        config = build_config(
            {
                "server": {"domain": DOMAIN, "data_dir": str(self.data_dir)},
                "storage": {"url": f"sqlite+aiosqlite:///{self.db_path}"},
                "c2s": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "direct_tls_port": 0,
                    "read_rate": 0,
                    "resume_timeout": 0.2,  # a case that asks for resumption ends quickly
                    "max_connections_per_ip": 0,
                },
                "auth": {"lockout": 0.0},  # mangled passwords must not lock Bob out
                "http": {"enabled": False},
            },
            base_dir=self.data_dir,
        )
        self.server = await Server.start(config)
        await add_user(self.server, "alice")
        await add_user(self.server, "bob")
        self.alice = await self.connect()
        await self.alice.login("alice", "desk")

    async def connect(self) -> Wire:
        assert self.server is not None
        port = self.server.direct_tls_port or 0
        return await Wire.open(port, self.server.host.config.cert_path)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.alice is not None:
                self.alice.close()
            if self.server is not None:
                self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def play(self, case: Case) -> None:
        """One case, then the checks: the healthy client is served, nothing left bound."""
        bob = await self.connect()
        try:
            for step in SESSION[: case.prefix]:
                await bob.send(step.data)
                if step.answer is not None:
                    await bob.expect(step.answer, STEP_TIMEOUT)
            await bob.send(case.tail)
            if case.ending == "wait-for-server":
                # The server closes on a stream error or </stream:stream>; otherwise a short
                # wait, and the client goes.
                with contextlib.suppress(TimeoutError, EOFError):
                    await bob.until_closed(0.3)
            elif case.ending == "reset":
                bob.reset()
            else:
                bob.writer.close()  # TLS close_notify, then FIN
        finally:
            bob.close()
        await self.settled()
        await self.healthy()

    async def settled(self) -> None:
        """Bob's connection is forgotten and none of his sessions is bound or detached."""
        assert self.server is not None
        server = self.server
        bare = JID.parse(VICTIM)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while (
                    len(server._connections) > 1
                    or bare in server.host.router.sessions
                    or any(c.jid.bare == bare for c in server.host.resumable.values())
                ):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            left = dict(server.host.router.sessions.get(bare, {}))
            raise AssertionError(
                f"left behind: {len(server._connections)} connections, sessions {left}"
            ) from None

    async def healthy(self) -> None:
        assert self.alice is not None
        self.pings += 1
        tag = f"alive-{self.pings}"
        await self.alice.send(
            f"<iq type='get' id='{tag}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>".encode()
        )
        await self.alice.expect(f'id="{tag}"'.encode(), STEP_TIMEOUT)


@pytest.fixture(scope="module")
def natterd(
    sqlite_migrated: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Natterd]:
    where = tmp_path_factory.mktemp("session-fuzz")
    db = where / "natter.db"
    shutil.copyfile(sqlite_migrated, db)
    server = Natterd(db, where / "data")
    root = logging.getLogger()
    root.addHandler(server.errors)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        root.removeHandler(server.errors)


@fuzz_budget(0.1)
@given(case=cases())
# The ghost session, bound and before authentication: always replayed.
@example(case=Case(5, b"<presence/>abc</x>", "wait-for-server"))
@example(case=Case(1, b"abc</x>", "close"))
def test_session_survives_mutated_traffic(natterd: Natterd, case: Case) -> None:
    natterd.errors.take()
    natterd.run(natterd.play(case))
    assert not natterd.errors.take()
