"""A client we did not write and that shares no code with slixmpp: Debian's go-sendxmpp (Go)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.e2e.harness import Client, add_user, clients, next_matching, running_server
from xmpp_server.jid import JID
from xmpp_server.server import Server

pytestmark = pytest.mark.skipif(
    shutil.which("go-sendxmpp") is None,
    reason="go-sendxmpp is not installed (make test installs it: apt-get install go-sendxmpp)",
)


def sendxmpp_args(server: Server, tmp_path: Path, user: str) -> list[str]:
    rc = tmp_path / f"{user}.rc"
    rc.write_text(f"username: {user}\npassword: correct horse\n")
    rc.chmod(0o600)
    # -n: the test certificate is self-signed.
    return ["go-sendxmpp", "-f", str(rc), "-j", f"127.0.0.1:{server.c2s_port}", "-n"]


async def test_go_sendxmpp_sends_to_slixmpp(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        async with clients(Client(server, b)) as (bob,):
            await bob.login()
            proc = await asyncio.create_subprocess_exec(
                *sendxmpp_args(server, tmp_path, a),
                b,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(b"hello from go\n"), 30)
            assert proc.returncode == 0, out
            msg = await next_matching(bob.messages, lambda m: m["body"].strip() == "hello from go")
            assert msg["from"].bare == a
            assert msg["type"] == "chat"


async def test_slixmpp_sends_to_go_sendxmpp(migrated_db_url: str, tmp_path: Path) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        listener = await asyncio.create_subprocess_exec(
            *sendxmpp_args(server, tmp_path, b),
            "-l",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            # Wait until the listener is online (it sends initial presence).
            async with asyncio.timeout(30):
                while not server.host.router.available(JID.parse(b)):
                    await asyncio.sleep(0.05)
            async with clients(Client(server, a)) as (alice,):
                await alice.login()
                alice.send_message(mto=b, mbody="hello go", mtype="chat")
                assert listener.stdout is not None
                line = await asyncio.wait_for(listener.stdout.readline(), 30)
                assert b"hello go" in line
                assert a.encode() in line
        finally:
            listener.terminate()
            await listener.wait()
