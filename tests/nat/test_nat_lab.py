"""STUN and TURN across real NATs: network namespaces, veth pairs and iptables MASQUERADE.

Each test builds its own lab (tests/nat/lab.py), runs the STUN/TURN server in the public
namespace and clients behind NATs, and tears everything down afterwards. The server is ours
(``natterd stun``); coturn, where installed, runs the same tests as a check on the lab itself.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from stun.credentials import turn_credentials
from tests.nat.lab import (
    SECRET,
    SERVER_IP,
    SERVER_IP2,
    STUN_PORT,
    NatLab,
    nat_lab,
    natterd_has_stun,
    start_stun_server,
    unavailable_reason,
    wan_ip,
)

_reason = unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_reason is not None, reason=f"no NAT lab: {_reason}"),
    # Namespaces, veths and nftables tables with fixed names, and the machine's routing: one
    # pytest worker runs every NAT lab test (pytest -n --dist loadgroup).
    pytest.mark.xdist_group("nat-lab"),
]

SERVER = f"{SERVER_IP}:{STUN_PORT}"
DEADLINE = 10.0  # seconds for ICE to connect: NAT'd calls take about 0.6 s, relayed a bit more


@pytest.fixture(params=["natterd", "coturn"])
def server_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "natterd" and not natterd_has_stun():
        pytest.skip("`natterd stun` does not exist yet")
    if kind == "coturn" and shutil.which("turnserver") is None:
        pytest.skip("coturn is not installed (apt-get install coturn)")
    return kind


async def test_binding_reveals_the_public_mapping_and_the_nat_type(
    server_kind: str, tmp_path: Path
) -> None:
    async with nat_lab("cone", "symmetric", tmp_path) as lab:
        await start_stun_server(lab, server_kind, tmp_path)
        servers = [(SERVER_IP, STUN_PORT), (SERVER_IP2, STUN_PORT)]
        cone, symmetric = await asyncio.gather(lab.probe(1, servers), lab.probe(2, servers))
        # Port-restricted cone: the NAT's wan address, one mapping whatever the destination.
        assert cone[0][0] == wan_ip(1)
        assert cone[0] == cone[1]
        # Symmetric: the wan address too, but a new port for every destination.
        assert [host for host, _ in symmetric] == [wan_ip(2), wan_ip(2)]
        assert symmetric[0][1] != symmetric[1][1]


async def connect(
    lab: NatLab, *, turn: bool, deadline: float = DEADLINE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two ICE agents, c1 controlling and c2 controlled, with the lab's STUN (and TURN)."""
    sides = []
    for n, role in ((1, "controlling"), (2, "controlled")):
        args = ["ice", "--role", role, "--stun", SERVER, "--deadline", str(deadline)]
        if turn:
            username, password = turn_credentials(SECRET, f"user{n}@localhost", 600, time.time())
            args += ["--turn", SERVER, "--username", username, "--password", password]
        sides.append(await lab.agent(lab.client(n), *args))
    first, second = sides
    try:
        offers = await asyncio.gather(first.read(15), second.read(15))
        first.write(offers[1])
        second.write(offers[0])
        results = await asyncio.gather(first.read(deadline + 5), second.read(deadline + 5))
    finally:
        await asyncio.gather(first.finish(), second.finish())
    for side, offer in zip(sides, offers, strict=True):
        assert offer["candidates"], f"{side.ns} gathered no candidates:\n{await side.stderr()}"
    return results[0], results[1]


async def test_symmetric_nats_connect_through_the_turn_relay(
    server_kind: str, tmp_path: Path
) -> None:
    async with nat_lab("symmetric", "symmetric", tmp_path) as lab:
        await start_stun_server(lab, server_kind, tmp_path)
        one, two = await connect(lab, turn=True)
        assert one["connected"] and two["connected"], (one, two)
        for result in (one, two):
            pair = (result["local"], result["remote"])
            assert "relay" in {c["type"] for c in pair}, pair
        assert one["received"] == "hello from controlled"
        assert two["received"] == "hello from controlling"


async def test_cone_nats_connect_directly_with_stun_alone(server_kind: str, tmp_path: Path) -> None:
    """The other half of the control: behind cone NATs the server-reflexive candidates our
    binding responses give are enough. (With TURN offered as well, which pair wins is a race:
    aioice nominates the first pair that answers.)"""
    async with nat_lab("cone", "cone", tmp_path) as lab:
        await start_stun_server(lab, server_kind, tmp_path)
        one, two = await connect(lab, turn=False)
        assert one["connected"] and two["connected"], (one, two)
        for result, peer in ((one, 2), (two, 1)):
            local, remote = result["local"], result["remote"]
            # A local server-reflexive candidate pairs as its base, the host socket (RFC 8445).
            assert local["type"] == "host", result
            assert remote["type"] in ("srflx", "prflx"), result
            assert remote["host"] == wan_ip(peer), result
        assert one["received"] == "hello from controlled"
        assert two["received"] == "hello from controlling"


async def test_symmetric_nats_do_not_connect_without_turn(tmp_path: Path) -> None:
    """The control for the relay test: STUN alone cannot get through two symmetric NATs."""
    kind = "natterd" if natterd_has_stun() else "coturn"
    if kind == "coturn" and shutil.which("turnserver") is None:
        pytest.skip("neither `natterd stun` nor coturn is available")
    async with nat_lab("symmetric", "symmetric", tmp_path) as lab:
        await start_stun_server(lab, kind, tmp_path)
        one, two = await connect(lab, turn=False, deadline=3.0)
        assert not one["connected"] and not two["connected"], (one, two)
