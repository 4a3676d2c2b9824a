"""However a stream ends, its teardown runs to the end (issue 13, defect 4: ghost sessions).

For each way a stream can end, at each stage of a session, with and without stream management:
the session leaves the router (a message to its full JID then goes to offline storage instead
of vanishing into a dead socket), what the client never acknowledged is rescued to offline
storage, the connection is forgotten, and nothing reaches asyncio's "Unhandled exception"
handler. Old main failed the rows where the parser still held text when it was released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.e2e.harness import DOMAIN, add_user
from tests.e2e.wire import Wire
from xmpp_server.config import build_config
from xmpp_server.jid import JID
from xmpp_server.server import Server
from xmpp_server.storage import Storage

TIMEOUT = 15.0
BOB = f"bob@{DOMAIN}"
STREAM_ERRORS = b"urn:ietf:params:xml:ns:xmpp-streams"

Stage = Literal["connected", "authenticated", "bound"]


@dataclass
class Run:
    """One case in progress: the server, a healthy client and the victim's connection."""

    server: Server
    db_url: str
    alice: Wire
    bob: Wire
    full: str | None = None
    replacement: Wire | None = None
    stopped: bool = False


@dataclass(frozen=True)
class Case:
    end: str
    stage: Stage
    sm: bool = False
    resume: bool = False
    direct_tls: bool = True

    def __str__(self) -> str:
        flags = ("-sm" if self.sm else "") + ("-resume" if self.resume else "")
        tls = "" if self.direct_tls else "-starttls"
        return f"{self.end}-{self.stage}{flags}{tls}"


# -- the ways a stream ends ---------------------------------------------------------------


async def close_stream(run: Run) -> None:
    assert (await run.bob.close_stream()).rstrip().endswith(b"</stream:stream>")


async def tcp_reset(run: Run) -> None:
    run.bob.reset()


async def tls_without_close_notify(run: Run) -> None:
    run.bob.drop_tls()
    await run.bob.until_closed()


async def error_expected(run: Run, data: bytes, *conditions: bytes) -> None:
    tail = await run.bob.until_closed() if not data else data
    assert any(b"<" + c + b" xmlns=\"" + STREAM_ERRORS in tail for c in conditions), tail[-500:]


async def not_well_formed(run: Run) -> None:
    await run.bob.send(b"<message><body>oops</mesage>")
    await error_expected(run, b"", b"not-well-formed")


async def text_outside_stanza(run: Run) -> None:
    # The reproduction: expat still holds "abc" when the parser is released.
    await run.bob.send(b"<presence/>abc</x>")
    await error_expected(run, b"", b"not-well-formed")


async def oversize(run: Run) -> None:
    await run.bob.send(b"<message to='alice@localhost'><body>" + b"A" * 40_000)
    # policy-violation today; the byte budget before authentication may name another limit.
    await error_expected(run, b"", b"policy-violation", b"resource-constraint", b"not-well-formed")


async def idle_timeout(run: Run) -> None:
    await error_expected(run, b"", b"connection-timeout")


async def auth_deadline(run: Run) -> None:
    """A client that trickles a byte now and then is still cut off at auth_timeout."""

    async def trickle() -> None:
        while True:
            await run.bob.send(b" ")
            await asyncio.sleep(0.1)

    task = asyncio.ensure_future(trickle())
    try:
        await error_expected(run, b"", b"policy-violation")
    finally:
        task.cancel()


async def conflict(run: Run) -> None:
    """A second login with the same resource replaces the first session."""
    run.replacement = await Wire.open(run.server.direct_tls_port or 0, cert(run.server))
    await run.replacement.login("bob", "victim")
    await error_expected(run, b"", b"conflict")


async def shutdown(run: Run) -> None:
    run.stopped = True
    await run.server.stop()


async def handled_count_too_high(run: Run) -> None:
    """XEP-0198: acknowledging more than was sent is a stream error naming both counts."""
    await run.bob.send(b"<a xmlns='urn:xmpp:sm:3' h='7'/>")
    tail = await run.bob.until_closed()
    await error_expected(run, tail, b"undefined-condition")
    assert b"<handled-count-too-high xmlns=\"urn:xmpp:sm:3\" h=\"7\" send-count=\"1\"" in tail


ENDS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "close-stream": close_stream,
    "tcp-reset": tcp_reset,
    "tls-no-close-notify": tls_without_close_notify,
    "not-well-formed": not_well_formed,
    "text-outside-stanza": text_outside_stanza,
    "oversize": oversize,
    "idle-timeout": idle_timeout,
    "auth-deadline": auth_deadline,
    "conflict": conflict,
    "shutdown": shutdown,
    "handled-count-too-high": handled_count_too_high,
}
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "oversize": {"limits": {"max_stanza_size": 10_000}},
    "idle-timeout": {"c2s": {"idle_timeout": 2.0}},
    "auth-deadline": {"c2s": {"auth_timeout": 1.5}},
}

EVERYWHERE = ["close-stream", "tcp-reset", "tls-no-close-notify", "not-well-formed"]
EVERYWHERE += ["text-outside-stanza", "oversize", "idle-timeout", "shutdown"]
CASES = [
    *(Case(end, "connected") for end in [*EVERYWHERE, "auth-deadline"]),
    *(Case(end, "authenticated") for end in ["close-stream", "tcp-reset", "auth-deadline"]),
    *(Case(end, "bound") for end in [*EVERYWHERE, "conflict"]),
    *(Case(end, "bound", sm=True) for end in [*EVERYWHERE, "conflict", "handled-count-too-high"]),
    Case("tcp-reset", "bound", sm=True, resume=True),
    Case("close-stream", "bound", direct_tls=False),
    Case("tcp-reset", "bound", sm=True, direct_tls=False),
]


# -- helpers ------------------------------------------------------------------------------


def cert(server: Server) -> Path:
    return server.host.config.cert_path


@contextlib.asynccontextmanager
async def serve(db_url: str, tmp_path: Path, case: Case) -> AsyncIterator[Run]:
    data: dict[str, Any] = {
        "server": {"domain": DOMAIN, "data_dir": str(tmp_path / "data")},
        "storage": {"url": db_url},
        "c2s": {"host": "127.0.0.1", "port": 0, "direct_tls_port": 0, "read_rate": 0},
        "http": {"enabled": False},
    }
    if case.resume:
        data["c2s"]["resume_timeout"] = 0.5
    for section, values in OVERRIDES.get(case.end, {}).items():
        data.setdefault(section, {}).update(values)
    server = await Server.start(build_config(data, base_dir=tmp_path))
    wires: list[Wire] = []
    run: Run | None = None
    try:
        await add_user(server, "alice")
        await add_user(server, "bob")
        alice = await Wire.open(server.direct_tls_port or 0, cert(server))
        wires.append(alice)
        await alice.login("alice", "desk")
        await alice.presence()
        port = server.direct_tls_port if case.direct_tls else server.c2s_port
        bob = await Wire.open(port or 0, cert(server), direct_tls=case.direct_tls)
        wires.append(bob)
        run = Run(server, db_url, alice, bob)
        yield run
    finally:
        for wire in [*wires, *([run.replacement] if run and run.replacement else [])]:
            wire.close()
        if run is None or not run.stopped:
            await server.stop()


async def keep_alive(wire: Wire) -> None:
    """Whitespace keepalives, so the healthy client outlives a short idle_timeout."""
    while True:
        await wire.send(b" ")
        await asyncio.sleep(0.3)


async def reach(run: Run, case: Case) -> None:
    """Take Bob's connection to the case's stage; when bound with SM, leave one message
    delivered but never acknowledged."""
    bob = run.bob
    if case.stage == "connected":
        await bob.open_stream()
        return
    await bob.authenticate("bob")
    if case.stage == "authenticated":
        return
    run.full = await bob.bind("victim")
    await bob.presence()
    if case.sm:
        await bob.enable_sm(resume=case.resume)
        await run.alice.send(
            f"<message to='{run.full}' type='chat' id='u1'><body>unacked-1</body></message>"
            .encode()
        )
        await bob.expect(b"unacked-1")


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            while not await predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def offline_bodies(storage: Storage) -> list[str]:
    rows = await storage.offline.fetch(BOB)
    return [xml.split("<body>", 1)[1].split("</body>", 1)[0] for _, xml in rows if "<body>" in xml]


async def only_alice_connected(run: Run) -> None:
    server = run.server

    async def gone() -> bool:
        # Bob's connection (and a replaced one) is forgotten; a detached session is over.
        expected = 2 if run.replacement is not None else 1
        return len(server._connections) == expected and not any(
            c.detached for c in server.host.resumable.values()
        )

    await wait_for(gone, "Bob's connection is gone")


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_teardown_runs_however_the_stream_ends(
    migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: Case
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(migrated_db_url, tmp_path, case) as run:
        alive = asyncio.ensure_future(keep_alive(run.alice))
        try:
            await reach(run, case)
            await ENDS[case.end](run)
            if run.stopped:
                await check_after_shutdown(run, case)
            else:
                await only_alice_connected(run)
                await check_after_end(run, case)
        finally:
            alive.cancel()
    unhandled = [r.getMessage() for r in caplog.records if "Unhandled exception" in r.getMessage()]
    assert not unhandled, unhandled
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


async def check_after_end(run: Run, case: Case) -> None:
    server = run.server
    router = server.host.router
    if run.full is None:
        assert JID.parse(BOB) not in router.sessions
        await ping(run.alice, "after")
        return
    full = JID.parse(run.full)
    session = router.session(full)
    expected = {"after"} if run.replacement is None else set()
    if case.sm:
        expected.add("unacked-1")  # rescued: Bob's client never acknowledged it
    if run.replacement is None:
        assert session is None, f"{run.full} is still bound after its stream ended"
    else:
        assert session is not None and session in server._connections
    await run.alice.send(
        f"<message to='{run.full}' type='chat' id='a1'><body>after</body></message>".encode()
    )
    if run.replacement is not None:
        await run.replacement.expect(b"<body>after</body>")

    async def stored() -> bool:
        return expected <= set(await offline_bodies(server.host.storage))

    await wait_for(stored, f"{sorted(expected)} are in Bob's offline storage")
    await ping(run.alice, "after")


async def check_after_shutdown(run: Run, case: Case) -> None:
    assert run.server.host.router.sessions == {}
    assert not run.server._connections
    if not case.sm:
        return
    storage = await Storage.open(run.db_url)
    try:
        assert "unacked-1" in await offline_bodies(storage)
    finally:
        await storage.close()


async def ping(wire: Wire, tag: str) -> None:
    """The healthy client is still served."""
    await wire.send(
        f"<iq type='get' id='ping-{tag}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>".encode()
    )
    await wire.expect(f"id=\"ping-{tag}\"".encode())
