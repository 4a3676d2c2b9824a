"""``natterctl announce`` against a running server, over the control socket."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    DOMAIN,
    Client,
    add_user,
    clients,
    free_udp_tcp_port,
    next_matching,
    running_server,
    running_server_on_free_ports,
)
from xmpp_server import control
from xmpp_server.cli import ctl_main


def ctl_config(tmp_path: Path) -> Path:
    """A natterctl configuration for the server ``running_server`` starts in ``tmp_path``."""
    path = tmp_path / "natterctl.toml"
    path.write_text(f'[server]\ndomain = "{DOMAIN}"\ndata_dir = "{tmp_path / "data"}"\n')
    return path


async def natterctl(config: Path, *args: str) -> int:
    """The real CLI entry point, in a thread: it runs its own event loop."""
    return await asyncio.to_thread(ctl_main, ["--config", str(config), *args])


async def test_announce_to_online_sessions(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        c = await add_user(server, "carol")
        async with clients(
            Client(server, f"{a}/phone"), Client(server, f"{a}/laptop"), Client(server, b)
        ) as online:
            for client in online:
                await client.login()
            code = await natterctl(
                ctl_config(tmp_path), "announce", "--subject", "Maintenance", "Back at 22:00"
            )
            assert code == 0
            assert capsys.readouterr().out == "announcement delivered to 3 online session(s)\n"
            for client in online:
                got = await next_matching(client.messages, lambda m: m["from"] == DOMAIN)
                assert got["subject"] == "Maintenance"
                assert got["body"] == "Back at 22:00"
                assert got["to"] == client.boundjid
                assert got["type"] == "normal"
            assert await server.host.storage.offline.count(c) == 0


async def test_announce_to_all_reaches_offline_accounts_at_login(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(migrated_db_url, tmp_path) as server:
        a, b = await add_user(server, "alice"), await add_user(server, "bob")
        c = await add_user(server, "carol")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            code = await natterctl(ctl_config(tmp_path), "announce", "--all", "New terms apply")
            assert code == 0
            assert capsys.readouterr().out == (
                "announcement delivered to 1 online session(s), stored for 2 offline account(s)\n"
            )
            await next_matching(alice.messages, lambda m: m["body"] == "New terms apply")
            assert await server.host.storage.offline.count(a) == 0
        assert await server.host.storage.offline.count(c) == 1
        async with clients(Client(server, b)) as (bob,):
            await bob.login()
            got = await next_matching(bob.messages, lambda m: m["body"] == "New terms apply")
            assert got["from"] == DOMAIN
            assert got["delay"]["stamp"] is not None


async def test_body_from_stdin(
    migrated_db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("line one\nline two\n"))
    async with running_server(migrated_db_url, tmp_path) as server:
        a = await add_user(server, "alice")
        async with clients(Client(server, a)) as (alice,):
            await alice.login()
            assert await natterctl(ctl_config(tmp_path), "announce", "--online", "-") == 0
            got = await next_matching(alice.messages, lambda m: m["from"] == DOMAIN)
            assert got["body"] == "line one\nline two\n"


async def test_no_server_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ctl_config(tmp_path)
    assert await natterctl(config, "announce", "hello?") == 1
    path = tmp_path / "data" / "natterd.ctl"
    assert capsys.readouterr().err == (
        f"natterctl: natterd does not seem to be running: no control socket at {path}\n"
    )
    # A socket file left behind by a crashed server is not a running server either.
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    assert await natterctl(config, "announce", "hello?") == 1
    assert "does not seem to be running" in capsys.readouterr().err


async def test_control_socket_is_private_replaces_stale_and_goes_away(
    migrated_db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "data" / "natterd.ctl"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    async with running_server(migrated_db_url, tmp_path) as server:
        assert server.control is not None and server.control.path == path
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        # A second server on the same data directory does not steal the socket.
        with pytest.raises(OSError, match="another natterd is listening"):
            await control.ControlServer.start(path, {})
        answer = await control.request(path, {"command": "announce", "body": "hi"})
        assert answer == {"ok": True, "delivered": 0, "stored": 0}
    assert not path.exists()


async def test_configured_socket_path_and_bad_requests(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = {"announce": {"control_socket": "admin.sock"}, "offline": {"enabled": False}}
    overrides = {"modules": modules}
    async with running_server(migrated_db_url, tmp_path, overrides) as server:
        path = tmp_path / "data" / "admin.sock"
        assert server.control is not None and server.control.path == path
        assert await control.request(path, {"command": "reboot"}) == {
            "ok": False,
            "error": "unknown command 'reboot' (known: announce, room.affiliate, room.create,"
            " room.delete, room.list, room.members, room.show, stats, user.unlock)",
        }
        answer = await control.request(path, {"command": "announce", "target": "some"})
        assert answer["ok"] is False and "target must be one of online, all" in answer["error"]
        answer = await control.request(path, {"command": "announce", "body": " "})
        assert answer == {"ok": False, "error": "the announcement needs a non-empty body"}

        config = ctl_config(tmp_path)
        config.write_text(
            config.read_text() + '[modules.announce]\ncontrol_socket = "admin.sock"\n'
        )
        assert await natterctl(config, "announce", "--all", "hello") == 1
        assert capsys.readouterr().err == (
            "natterctl: natterd refused the announcement: "
            "cannot store for offline accounts: the offline module is off\n"
        )


async def test_stats_count_sessions_rooms_and_stun_requests(
    migrated_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``natterctl stats``: the counters a metrics exporter will publish, STUN's included."""

    def overrides() -> dict[str, dict[str, Any]]:
        ports = {"udp_port": free_udp_tcp_port(), "tcp_port": 0, "tls_port": 0}  # 0: off
        return {"stun": {"enabled": True, "host": ["127.0.0.1"], **ports}}

    async with running_server_on_free_ports(migrated_db_url, tmp_path, overrides) as server:
        a = await add_user(server, "alice")
        assert server.stun is not None
        host, port = server.stun.addresses("udp")[0]
        binding = bytes.fromhex("0001 0000 2112a442") + os.urandom(12)  # a bare Binding

        def ask() -> bytes:  # blocking, so in a thread: the server runs on this loop
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(10)
                sock.sendto(binding, (host, port))
                return sock.recv(1500)

        assert (await asyncio.to_thread(ask))[:2] == bytes.fromhex("0101")  # Binding success
        async with clients(Client(server, f"{a}/phone")) as (alice,):
            await alice.login()
            alice.send_presence(pto="team@conference.localhost/alice")
            room = "team@conference.localhost"
            await next_matching(alice.presences, lambda p: p["from"].bare == room)
            assert await natterctl(ctl_config(tmp_path), "stats") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sessions"] == 1 and stats["accounts_online"] == 1
    assert stats["muc"] == {"rooms_loaded": 1, "occupants": 1}
    assert stats["stun"]["requests"] == {"BINDING": 1}
