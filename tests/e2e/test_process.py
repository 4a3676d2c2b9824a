"""The `make run` path as processes: natterctl provisions, natterd serves, a client logs in.

Also: natterd refuses an unmigrated database, stops cleanly on SIGTERM, and what it
stored survives a restart and a crash (SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.e2e.harness import TIMEOUT, Client, Endpoint, clients, next_matching

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def config_file(db_url: str, tmp_path: Path) -> Path:
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
port = {free_port()}
direct_tls_port = {free_port()}

[http]
port = {free_port()}
tls_port = {free_port()}
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


@asynccontextmanager
async def natterd(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
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
    serving = asyncio.Event()

    async def drain(stream: asyncio.StreamReader) -> None:
        # Read the log to the end: a full pipe would block the server's event loop.
        while line := await stream.readline():
            output.append(line)
            if b"natterd serving" in line:
                serving.set()

    reader = asyncio.ensure_future(drain(proc.stdout))
    try:
        async with asyncio.timeout(60):
            while not serving.is_set():
                assert not reader.done(), "natterd exited before serving"
                await asyncio.wait([reader], timeout=0.05)
        yield proc
    except BaseException:
        # The server's log is the first thing to read when a test here fails.
        sys.stderr.write("natterd output:\n" + b"".join(output).decode(errors="replace"))
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


def endpoint(config: Path) -> Endpoint:
    ports = [
        int(line.split("=")[1]) for line in config.read_text().splitlines() if "port =" in line
    ]
    return Endpoint(ports[0], ports[1], config.parent / "data" / "tls" / "localhost.crt")


async def provision(config: Path) -> Endpoint:
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
    return endpoint(config)


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
    server = await provision(config_file)
    async with natterd(config_file) as proc:
        async with clients(Client(server, "alice@localhost")) as (alice,):
            await alice.login()
            alice.send_message(mto="bob@localhost", mbody="before restart", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    async with natterd(config_file) as proc:
        async with clients(Client(server, "alice@localhost")) as (alice,):
            await alice.login()
            alice.send_message(mto="bob@localhost", mbody="before crash", mtype="chat")
            await alice.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    async with natterd(config_file):
        async with clients(Client(server, "bob@localhost")) as (bob,):
            await bob.login()
            first = await next_matching(bob.messages, lambda m: m["type"] == "chat")
            second = await next_matching(bob.messages, lambda m: m["type"] == "chat")
            assert [first["body"], second["body"]] == ["before restart", "before crash"]


async def test_sigkill_keeps_every_acknowledged_message(config_file: Path) -> None:
    """Kill -9 while Alice streams to offline Bob: every message the server acknowledged
    (XEP-0198 <a/>) reaches Bob after the restart, once."""
    server = await provision(config_file)
    async with natterd(config_file) as proc:
        alice = Client(server, "alice@localhost", stream_management=True)
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
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            acked = set(acked_bodies())
    assert len(acked) >= 150
    async with natterd(config_file):
        async with clients(Client(server, "bob@localhost")) as (bob,):
            await bob.login()
            await bob.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            got = [m["body"] for m in bob.messages.items if m["type"] == "chat"]
    assert acked <= set(got), sorted(acked - set(got))
    assert len(got) == len(set(got)), "duplicates"
    assert got == sorted(got, key=lambda b: int(b[1:])), "out of order"
