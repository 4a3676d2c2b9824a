"""The `make run` path as processes: natterctl provisions, natterd serves, a client logs in.

Also: natterd refuses an unmigrated database, stops cleanly on SIGTERM, and what it
stored survives a restart and a crash (SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import TIMEOUT, Client, Endpoint, clients, next_matching
from tests.ports import free_tcp_port, retry_on_port_clash

BIN = Path(sys.executable).parent
LISTENING = re.compile(rb"(c2s|c2s direct TLS) listening on (?:\[[^\]]+\]|[^\s:]+):(\d+)")
HTTP_PORT = re.compile(r"(?m)^(\[http\]\nhost = \S+\nport = )\d+$")


@pytest.fixture
def config_file(db_url: str, tmp_path: Path) -> Path:
    return write_config(db_url, tmp_path)


def write_config(db_url: str, tmp_path: Path) -> Path:
    """c2s on port 0 (natterd logs the port it got); the HTTP port, where 0 means off, is
    set anew by ``natterd()`` at each start, and again if something took it meanwhile."""
    path = tmp_path / "natterd.toml"
    path.write_text(
        f"""
[server]
domain = "localhost"
data_dir = "data"

[storage]
url = "{db_url}"

[c2s]
host = "127.0.0.1"
port = 0
direct_tls_port = 0

[http]
host = "127.0.0.1"
port = {free_tcp_port()}
tls_port = 0
"""
    )
    return path


async def ctl(config: Path, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "natterctl"),
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@dataclass
class Natterd:
    """A natterd process, its log so far and where its clients connect."""

    proc: asyncio.subprocess.Process
    output: list[bytes]
    reader: asyncio.Future[None]
    endpoint: Endpoint


async def start_natterd(config: Path) -> Natterd:
    """natterd up to "natterd serving" on a free HTTP port, its c2s ports read back from its
    log. Raises with natterd's output if it exits first (a port clash among others)."""
    config.write_text(HTTP_PORT.sub(rf"\g<1>{free_tcp_port()}", config.read_text()))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "natterd"),
        "--config",
        str(config),
        "run",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    output: list[bytes] = []
    ports: dict[bytes, int] = {}
    serving = asyncio.Event()

    async def drain(stream: asyncio.StreamReader) -> None:
        # Read the log to the end: a full pipe would block the server's event loop.
        while line := await stream.readline():
            output.append(line)
            if match := LISTENING.search(line):
                ports[match[1]] = int(match[2])
            if b"natterd serving" in line:
                serving.set()

    reader = asyncio.ensure_future(drain(proc.stdout))
    try:
        async with asyncio.timeout(60):
            while not serving.is_set():
                if reader.done():
                    await proc.wait()
                    text = b"".join(output).decode(errors="replace")
                    raise AssertionError(f"natterd exited before serving:\n{text}")
                await asyncio.wait([reader], timeout=0.05)
        cert = config.parent / "data" / "tls" / "localhost.crt"
        endpoint = Endpoint(ports[b"c2s"], ports[b"c2s direct TLS"], cert)
    except BaseException:
        # Whatever went wrong (no "c2s listening on" line in the log, too), natterd goes.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader
        raise
    return Natterd(proc, output, reader, endpoint)


@asynccontextmanager
async def natterd(config: Path) -> AsyncIterator[Natterd]:
    running = await retry_on_port_clash(lambda: start_natterd(config))
    try:
        yield running
    except BaseException:
        # The server's log is the first thing to read when a test here fails.
        sys.stderr.write("natterd output:\n" + b"".join(running.output).decode(errors="replace"))
        raise
    finally:
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()
        await running.reader


async def provision(config: Path) -> None:
    """What an operator does with natterctl: migrate, then add alice and bob."""
    code, out = await ctl(config, "db", "upgrade")
    assert code == 0, out
    for user in ("alice", "bob"):
        code, out = await ctl(
            config,
            "user",
            "add",
            f"{user}@localhost",
            "--password-file",
            "-",
            stdin=b"correct horse\n",
        )
        assert code == 0, out


async def test_unmigrated_database_is_refused(config_file: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "natterd"),
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3
    assert b"natterctl db upgrade" in out


async def test_provision_serve_restart_and_crash(config_file: Path) -> None:
    await provision(config_file)
    async with natterd(config_file) as running:
        async with clients(Client(running.endpoint, "alice@localhost")) as (alice,):
            await alice.login()
            alice.send_message(mto="bob@localhost", mbody="before restart", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
        running.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.proc.wait(), 30) == 0
    async with natterd(config_file) as running:
        async with clients(Client(running.endpoint, "alice@localhost")) as (alice,):
            await alice.login()
            alice.send_message(mto="bob@localhost", mbody="before crash", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
        os.kill(running.proc.pid, signal.SIGKILL)
        await running.proc.wait()
    async with natterd(config_file) as running:
        async with clients(Client(running.endpoint, "bob@localhost")) as (bob,):
            await bob.login()
            first = await next_matching(bob.messages, lambda m: m["type"] == "chat")
            second = await next_matching(bob.messages, lambda m: m["type"] == "chat")
            assert [first["body"], second["body"]] == ["before restart", "before crash"]


async def test_sigkill_keeps_every_acknowledged_message(config_file: Path) -> None:
    """Kill -9 while Alice streams to offline Bob: every message the server acknowledged
    (XEP-0198 <a/>) reaches Bob after the restart, once."""
    await provision(config_file)
    async with natterd(config_file) as running:
        alice = Client(running.endpoint, "alice@localhost", stream_management=True)
        async with clients(alice):
            await alice.login()

            def acked_bodies() -> list[str]:
                return [s["body"] for s in alice.acked if s.name == "message"]

            sent = 0
            async with asyncio.timeout(60):
                while len(acked_bodies()) < 150:
                    if sent - len(acked_bodies()) < 20:  # a window of 20 in flight
                        alice.send_message(mto="bob@localhost", mbody=f"s{sent}", mtype="chat")
                        sent += 1
                    else:
                        alice.plugin["xep_0198"].request_ack()
                        await asyncio.sleep(0.005)
            # Keep streaming while the server dies mid-flight.
            for _ in range(50):
                alice.send_message(mto="bob@localhost", mbody=f"s{sent}", mtype="chat")
                sent += 1
            os.kill(running.proc.pid, signal.SIGKILL)
            await running.proc.wait()
            acked = set(acked_bodies())
    assert len(acked) >= 150
    async with natterd(config_file) as running:
        async with clients(Client(running.endpoint, "bob@localhost")) as (bob,):
            await bob.login()
            await bob.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            got = [m["body"] for m in bob.messages.items if m["type"] == "chat"]
    assert acked <= set(got), sorted(acked - set(got))
    assert len(got) == len(set(got)), "duplicates"
    assert got == sorted(got, key=lambda b: int(b[1:])), "out of order"
