"""The service around the cores: settings from ``[stun]``, natterd's Server, ``natterd stun``."""

from __future__ import annotations

import asyncio
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import aiostun
import pytest

from stun.service import StunService, alternate, relay_hosts
from stun.turn import RelayHost
from tests.ports import retry_on_port_clash
from tests.stun.live import free_port, started, stun_config
from xmpp_server.cli import main
from xmpp_server.config import ConfigError, StunConfig, build_config
from xmpp_server.server import Server


def no_route(version: int) -> str | None:
    return None


def test_relays_bind_on_the_first_host_of_each_family() -> None:
    config = StunConfig(host=("192.0.2.1", "2001:db8::1", "192.0.2.2"))
    assert relay_hosts(config, no_route) == {
        4: RelayHost("192.0.2.1", "192.0.2.1"),
        6: RelayHost("2001:db8::1", "2001:db8::1"),
    }


def test_relay_host_wins() -> None:
    config = StunConfig(host=("0.0.0.0", "::"), relay_host="192.0.2.9")
    assert relay_hosts(config, no_route) == {4: RelayHost("192.0.2.9", "192.0.2.9")}


def test_wildcard_relays_advertise_public_host_or_the_route_address() -> None:
    config = StunConfig(host=("0.0.0.0", "::"), public_host="198.51.100.1")
    routes = {4: "10.0.0.5", 6: "2001:db8::5"}
    assert relay_hosts(config, routes.get) == {
        4: RelayHost("0.0.0.0", "198.51.100.1"),
        6: RelayHost("::", "2001:db8::5"),
    }
    # A public_host that is a name cannot be put in XOR-RELAYED-ADDRESS.
    named = StunConfig(host=("0.0.0.0",), public_host="turn.example.org")
    assert relay_hosts(named, routes.get) == {4: RelayHost("0.0.0.0", "10.0.0.5")}
    assert relay_hosts(named, no_route) == {}


def test_relay_host_must_be_an_address() -> None:
    with pytest.raises(ConfigError, match="stun.relay_host"):
        relay_hosts(StunConfig(relay_host="turn.example.org"))


def test_alternate_pairs_with_a_concrete_host() -> None:
    config = StunConfig(host=("0.0.0.0", "192.0.2.1"), alternate_host="192.0.2.2")
    pairing = alternate(config)
    assert pairing is not None
    assert (pairing.hosts, pairing.ports) == (("192.0.2.1", "192.0.2.2"), (3478, 3479))
    assert alternate(StunConfig()) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alternate_host": "stun2.example.org"}, "expected an IP address"),
        ({"alternate_host": "192.0.2.2"}, "needs a specific IPv4 address in stun.host"),
        (
            {"host": ("192.0.2.1",), "alternate_host": "192.0.2.2", "alternate_port": 3478},
            "a different stun.alternate_port",
        ),
    ],
)
def test_alternate_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        alternate(StunConfig(**values))
    assert info.value.key == "stun.alternate_host"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"allowed_peers": ["10.0.0.0/33"]}, "stun.allowed_peers"),
        ({"relay_min_port": 50000, "relay_max_port": 40000}, "stun.relay_min_port"),
    ],
)
async def test_config_errors_at_start(tmp_path: Path, values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        await StunService.start(stun_config(tmp_path, **values))
    assert info.value.key == key


async def test_generated_secret_is_shared(tmp_path: Path) -> None:
    running = await started(tmp_path, secret="", tls_port=0)
    try:
        path = tmp_path / "data" / "turn.secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert running.network.core.auth is not None
        assert running.network.core.auth.secret == path.read_text().strip()
    finally:
        await running.stop()


async def binding(port: int) -> dict[str, Any]:
    async with aiostun.Client(host="127.0.0.1", port=port, timeout=5) as client:
        mapped: dict[str, Any] = await client.get_mapped_address()
    return mapped


async def test_natterd_runs_stun_when_enabled(tmp_path: Path, sqlite_migrated: Path) -> None:
    database = tmp_path / "natter.db"
    shutil.copyfile(sqlite_migrated, database)

    async def start() -> Server:
        data = {
            "server": {"domain": "localhost", "data_dir": str(tmp_path / "data")},
            "storage": {"url": f"sqlite+aiosqlite:///{database}"},
            "c2s": {"host": "127.0.0.1", "port": 0, "direct_tls_port": 0},
            "http": {"enabled": False},  # on by default, on 5280: the port of `make run`
            "stun": {
                "enabled": True,
                "host": ["127.0.0.1"],
                "udp_port": free_port(),
                "tcp_port": 0,
                "tls_port": 0,
                "secret": "x",
            },
        }
        return await Server.start(build_config(data, base_dir=tmp_path))

    server = await retry_on_port_clash(start)
    try:
        assert server.stun is not None
        ((_, udp_port),) = server.stun.addresses("udp")
        assert [listener.transport for listener in server.stun.listeners] == ["udp"]
        assert (await binding(udp_port))["ip"] == "127.0.0.1"
    finally:
        await server.stop()
    assert server.stun is None


async def stun_process(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    """``natterd stun`` answering on a free UDP port (a new one if it lost the port)."""
    port = free_port()
    config = tmp_path / "natterd.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[stun]\nhost = ["127.0.0.1"]\nudp_port = {port}\ntcp_port = 0\ntls_port = 0\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmpp_server",
        "--config",
        str(config),
        "stun",
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(100):  # until it listens
        if process.returncode is not None:
            _, err = await process.communicate()
            raise OSError(f"natterd stun exited: {err.decode(errors='replace')}")
        async with aiostun.Client(host="127.0.0.1", port=port, timeout=0.2) as client:
            if (await client.get_mapped_address()).get("ip") == "127.0.0.1":
                return process, port
    process.kill()
    await process.communicate()
    raise AssertionError("natterd stun did not answer")


async def test_natterd_stun_subcommand(tmp_path: Path) -> None:
    process, _ = await retry_on_port_clash(lambda: stun_process(tmp_path))
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert b"STUN listening on udp 127.0.0.1" in err
    assert (tmp_path / "data" / "turn.secret").is_file()  # TURN is on by default


def test_natterd_stun_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "natterd.toml"
    config.write_text(
        '[stun]\nallowed_peers = ["not a network"]\nudp_port = 0\ntcp_port = 0\ntls_port = 0\n'
    )
    assert main(["--config", str(config), "stun"]) == 2
    assert capsys.readouterr().err.startswith("natterd: stun.allowed_peers: ")


async def test_workers_share_the_ports_and_stop_with_the_service(tmp_path: Path) -> None:
    """[stun] workers = 2: a second process answers on the same UDP and TCP ports; the kernel
    spreads clients by address, so 64 source ports reach both processes."""
    service = await started(tmp_path, tls_port=0, workers=2, rate=0)
    ports = {listener.transport: listener.address[1] for listener in service.listeners}
    try:
        assert len(service.workers) == 1 and service.workers[0].is_alive()
        answers = await asyncio.gather(*(binding(ports["udp"]) for _ in range(64)))
        assert all(answer["ip"] == "127.0.0.1" for answer in answers)
        assert len({answer["port"] for answer in answers}) == 64  # each its own mapping
        # Both answered: this process saw some of the 64, not all (2 * 2**-64 otherwise).
        assert 0 < service.stats.requests["BINDING"] < 64
        async with aiostun.Client(
            host="127.0.0.1", port=ports["tcp"], proto=aiostun.TCP, timeout=5
        ) as client:
            assert (await client.get_mapped_address())["ip"] == "127.0.0.1"
        worker = service.workers[0]
    finally:
        await service.stop()
    assert not worker.is_alive() and not service.workers
