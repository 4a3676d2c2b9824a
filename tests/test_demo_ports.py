"""`make test` passes while `make run` is up, and does not lose port races (issue 13, defect 10).

Every test here runs with the demo's ports (and natterd's default ports) taken, as they are on
the machine of someone running the demo; ``make test`` holds them for the whole suite too
(``NATTER_TEST_TAKE_DEMO_PORTS=1``). natterd binds port 0 and logs the port it got; a start that
loses its port undoes itself, so the test can start again on another one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import DOMAIN, Client, add_user, clients, running_server
from tests.e2e.test_process import natterd, provision, write_config
from tests.e2e.test_upload import http_on, upload_server
from tests.ports import (
    TAKE_DEMO_PORTS_ENV,
    free_tcp_port,
    holding_demo_ports,
    is_port_clash,
    on_free_port,
    retry_on_port_clash,
)
from tests.stun.live import started
from xmpp_server.server import Server

Held = list[tuple[str, socket.SocketKind, int]]


@pytest.fixture
def demo_ports_taken() -> Iterator[Held]:
    with holding_demo_ports() as taken:
        yield taken


@pytest.fixture
def config_file(db_url: str, tmp_path: Path) -> Path:
    return write_config(db_url, tmp_path)


def test_the_demo_ports_are_taken(demo_ports_taken: Held) -> None:
    """The fixture holds what `make run` listens on, so the tests below mean something."""
    assert {port for _, _, port in demo_ports_taken} >= {5222, 5223, 5280, 5281}
    for host, kind, port in demo_ports_taken:
        with socket.socket(socket.AF_INET, kind) as sock, pytest.raises(OSError) as info:
            sock.bind((host, port))
        assert is_port_clash(info.value)


async def test_natterd_process_logs_the_ports_it_bound(
    demo_ports_taken: Held, config_file: Path
) -> None:
    """natterd with c2s port 0 says where it listens ("c2s listening on HOST:PORT"), and a
    client logs in there: how the process tests find a server that `make run` cannot disturb."""
    await provision(config_file)
    async with natterd(config_file) as running:
        log = b"".join(running.output).decode()
        c2s = running.endpoint.c2s_port
        assert f"c2s listening on 127.0.0.1:{c2s}\n" in log
        assert f"c2s direct TLS listening on 127.0.0.1:{running.endpoint.direct_tls_port}" in log
        assert c2s not in {port for _, _, port in demo_ports_taken}
        async with clients(Client(running.endpoint, f"alice@{DOMAIN}")) as (alice,):
            await alice.login()


async def test_a_start_that_lost_its_port_can_start_again(
    demo_ports_taken: Held, migrated_db_url: str, tmp_path: Path
) -> None:
    """A server whose port is taken fails with EADDRINUSE and leaves nothing behind: no
    listener, no control socket, no module's task; the same process then starts it again, in
    the same data directory, on a free port (what ``retry_on_port_clash`` relies on)."""
    before = asyncio.all_tasks()
    taken: dict[str, Any] = {"port": 0, "direct_tls_port": 5223}  # the demo holds 5223
    with pytest.raises(OSError) as info:
        async with running_server(migrated_db_url, tmp_path, {"c2s": taken}):
            pytest.fail("started on a taken port")
    assert is_port_clash(info.value)
    with pytest.raises(OSError) as info:  # HTTP starts before c2s, after the modules
        async with running_server(migrated_db_url, tmp_path, {"http": http_on(5280)}):
            pytest.fail("started on a taken port")
    assert is_port_clash(info.value)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set(), "a failed start left tasks running"

    def start(port: int) -> Any:
        return running_server(migrated_db_url, tmp_path, {"http": http_on(port)})

    async with on_free_port(start) as server:
        assert isinstance(server, Server)
        jid = await add_user(server, "alice")
        async with clients(Client(server, jid)) as (alice,):
            await alice.login()


async def test_retry_on_port_clash_starts_again_on_a_new_port(
    demo_ports_taken: Held, migrated_db_url: str, tmp_path: Path
) -> None:
    """The helper's contract: a clash means another try with fresh ports, anything else is
    the test's own failure and goes straight up."""
    ports = iter([5280, 5280, free_tcp_port()])  # taken twice, as if others won the race

    def start(port: int) -> Any:
        return running_server(migrated_db_url, tmp_path, {"http": http_on(port)})

    async with on_free_port(start, lambda: next(ports)) as server:
        assert server.host.config.http.port != 5280
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise OSError("not a clash")

    with pytest.raises(OSError, match="not a clash"):
        await retry_on_port_clash(broken)
    assert calls == 1


async def test_upload_and_stun_start_beside_the_demo(
    demo_ports_taken: Held, migrated_db_url: str, tmp_path: Path
) -> None:
    """The listeners whose port 0 means "off" (HTTP, STUN) start on ports of their own."""
    async with upload_server(migrated_db_url, tmp_path / "upload") as (server, base):
        assert server.host.config.http.port not in {5280, 5281}
        assert base == f"http://127.0.0.1:{server.host.config.http.port}"
    stun = await started(tmp_path / "stun", tls_port=0)
    try:
        assert {port for _, port in stun.addresses("udp")}.isdisjoint({3478, 3479})
    finally:
        await stun.stop()


# Tests that once needed a port of the demo, or picked a port and handed it on: each binds
# port 0 now, or retries on a clash (test_natterd_runs_stun_when_enabled had HTTP on 5280).
PORT_SENSITIVE = (
    "tests/stun/test_stun_service.py::test_natterd_runs_stun_when_enabled",
    "tests/stun/test_stun_service.py::test_natterd_stun_subcommand",
    "tests/e2e/test_upload.py::test_https_port[sqlite]",
    "tests/e2e/test_process.py::test_provision_serve_restart_and_crash[sqlite]",
)


async def test_port_sensitive_tests_pass_beside_the_demo(demo_ports_taken: Held) -> None:
    """What `make test` does for the whole suite, for the tests that were port-sensitive: run
    them with the demo's ports taken."""
    root = Path(__file__).parents[1]
    env = {**os.environ, TAKE_DEMO_PORTS_ENV: "1", "NATTER_TEST_SKIP_POSTGRES": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        *PORT_SENSITIVE,
        cwd=root,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert f"{len(PORT_SENSITIVE)} passed" in out.decode()
