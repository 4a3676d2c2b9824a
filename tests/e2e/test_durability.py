"""kill -9 loses no message acknowledged to its sender (issue 13, defect 5), on both stores.

natterd runs as a child process and is killed with SIGKILL while the recipient is (a) online
with messages it has not acknowledged, (b) detached, awaiting resumption, (c) offline. Alice
sends with XEP-0198 and counts the server's acks; after a restart Bob logs in afresh and
every acknowledged message arrives, once. (a) and (b) lost every message before the mailbox
(docs/storage-modes.md): they were held only in the dead process's memory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.harness import TIMEOUT, Client, clients
from tests.e2e.test_process import config_file, natterd, provision

__all__ = ["config_file"]  # the fixture, shared with test_process

N = 40  # messages per phase


async def send_acked(alice: Client, first: int, count: int) -> None:
    """Send ``count`` messages to Bob and wait until the server acknowledged every one."""
    for i in range(first, first + count):
        alice.send_message(mto="bob@localhost", mbody=f"m{i}", mtype="chat")
    async with asyncio.timeout(30):
        while len(acked(alice)) < first + count:
            alice.plugin["xep_0198"].request_ack()
            await asyncio.sleep(0.05)


def acked(alice: Client) -> set[str]:
    return {s["body"] for s in alice.acked if s.name == "message"}


@pytest.mark.parametrize("recipient", ["online", "detached", "offline"])
async def test_kill_9_keeps_every_acknowledged_message(config_file: Path, recipient: str) -> None:
    await provision(config_file)
    async with natterd(config_file) as running:
        alice = Client(running.endpoint, "alice@localhost", stream_management=True)
        bob = Client(running.endpoint, "bob@localhost", stream_management=True)
        async with clients(alice, bob):
            await alice.login()
            if recipient != "offline":
                await bob.login()
                bob.transport.pause_reading()  # Bob's phone froze: no acks from now on
            await send_acked(alice, 0, N)
            if recipient == "detached":
                # Bob's TCP connection drops; natterd keeps his session for resumption.
                bob.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
                await asyncio.sleep(0.5)
                await send_acked(alice, N, N)
            sent = acked(alice)
            os.kill(running.proc.pid, signal.SIGKILL)
            await running.proc.wait()
    assert len(sent) == (2 * N if recipient == "detached" else N)
    async with natterd(config_file) as running:
        async with clients(Client(running.endpoint, "bob@localhost")) as (bob_again,):
            await bob_again.login()
            await bob_again.plugin["xep_0199"].ping("localhost", timeout=TIMEOUT)
            got = [m["body"] for m in bob_again.messages.items if m["type"] == "chat"]
    assert sent <= set(got), f"{len(sent - set(got))} acknowledged messages lost"
    assert len(got) == len(set(got)), "duplicates"
    assert got == sorted(got, key=lambda b: int(b[1:])), "out of order"
