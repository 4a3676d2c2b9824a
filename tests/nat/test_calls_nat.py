"""Calls across real NATs: a whole natterd (XMPP, STUN/TURN, media relay) in the lab's public
namespace, ``natterctl answer`` and ``natterctl call`` (the softphone) in the two client
namespaces, each behind its own NAT (tests/nat/lab.py).

* port-restricted cone NATs: the call goes directly between the NATs' mappings, learnt from
  our STUN (the server offers no TURN here: with TURN offered too, which working pair aioice
  nominates first is a race, see test_nat_lab.py);
* symmetric NATs, ``media = "direct"``: only our TURN gets through, and its counters show it;
* symmetric NATs, ``media = "relay"``: each client talks to its anchored leg in the relay, and
  at the socket level each leg is one UDP socket (in the relay's port range) carrying RTP and
  RTCP both ways, counted by nftables rules in the server's namespace.

Every call sends 440 Hz from the caller and 660 Hz from the callee; both recordings are
checked by FFT. The server uses SQLite only: PostgreSQL listens on the host's loopback, which
the lab's namespaces cannot reach (and storage plays no part in media paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.nat.lab import (
    CALL_RELAY_PORTS,
    DOMAIN,
    NATTERCTL,
    SERVER_IP,
    NatLab,
    NatType,
    nat_lab,
    natterd_calls_config,
    start_natterd,
    unavailable_reason,
    wan_ip,
)
from tests.voip.test_call_cli import read_wav
from voip.softphone import dominant_frequency
from xmpp_server import control
from xmpp_server.cli import ctl_main
from xmpp_server.config import load_config

_reason = unavailable_reason()
if _reason is None and shutil.which("nft") is None:
    _reason = "`nft` is not installed (apt-get install nftables): it counts RTP/RTCP per socket"
pytestmark = [
    pytest.mark.skipif(_reason is not None, reason=f"no NAT lab: {_reason}"),
    # Namespaces, veths and nftables tables with fixed names, and the machine's routing: one
    # pytest worker runs every NAT lab test (pytest -n --dist loadgroup).
    pytest.mark.xdist_group("nat-lab"),
]

CALLER, CALLEE = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
TONES = {CALLER: 440.0, CALLEE: 660.0}
SECONDS = 2.5  # the caller hangs up after this long connected
DEADLINE = 30.0  # signalling and ICE; NAT'd calls connect in about a second
REPORT = re.compile(
    r"call with (?P<peer>\S+): heard (?P<seconds>[\d.]+) s, dominant .*; ended: (?P<reason>[\w-]+)"
    r"; ice: (?P<local_type>\w+) (?P<local_host>[\d.]+):(?P<local_port>\d+)"
    r" -> (?P<remote_type>\w+) (?P<remote_host>[\d.]+):(?P<remote_port>\d+)"
)


@dataclass(frozen=True)
class Side:
    """What one ``natterctl`` printed, and the dominant frequency of what it recorded."""

    line: str
    local: tuple[str, str, int]  # (candidate type, host, port) of the selected pair
    remote: tuple[str, str, int]
    frequency: float

    @classmethod
    def parse(cls, out: str, wav: Path) -> Side:
        match = REPORT.search(out)
        assert match is not None, f"no call report with an ICE pair in {out!r}"
        assert match["reason"] == "success", out
        heard = read_wav(wav)[24000:]  # past the jitter buffer's first half second
        assert len(heard) >= 48000, f"{wav.name}: only {len(heard) / 48000:.2f} s heard"
        return cls(
            match[0],
            (match["local_type"], match["local_host"], int(match["local_port"])),
            (match["remote_type"], match["remote_host"], int(match["remote_port"])),
            dominant_frequency(heard),
        )


@dataclass
class CallsLab:
    lab: NatLab
    config: Path
    tmp: Path
    natterd_pid: int

    async def stats(self) -> dict[str, Any]:
        """``natterctl stats`` over the control socket (a file: reachable from any netns)."""
        path = control.socket_path(load_config(self.config))
        answer = await control.request(path, {"command": "stats"}, timeout=10)
        assert answer.get("ok"), answer
        stats: dict[str, Any] = answer["stats"]
        return stats

    async def call(self, during: Callable[[], Awaitable[None]] | None = None) -> tuple[Side, Side]:
        """Bob answers in c2, Alice calls him from c1; ``during`` runs while they talk."""
        password = self.tmp / "password"
        natterctl: list[str | Path] = [NATTERCTL, "--config", self.config]
        common: list[str | Path] = ["--password-file", password, "--timeout", str(DEADLINE)]
        answering = await self.lab.spawn(
            self.lab.client(2),
            [*natterctl, "answer", "--as", CALLEE, "--tone", str(TONES[CALLEE]),
             "--record", self.tmp / "callee.wav", *common],
            self.tmp / "answer.log",
        )  # fmt: skip
        async with asyncio.timeout(DEADLINE):
            while (await self.stats())["sessions"] < 1:
                if answering.process.returncode is not None:  # could not log in
                    await answering.output(DEADLINE)  # fails with its log
                await asyncio.sleep(0.1)
        calling = await self.lab.spawn(
            self.lab.client(1),
            [*natterctl, "call", CALLEE, "--as", CALLER, "--tone", str(TONES[CALLER]),
             "--duration", str(SECONDS), "--record", self.tmp / "caller.wav", *common],
            self.tmp / "call.log",
        )  # fmt: skip
        watching = asyncio.ensure_future(during() if during else asyncio.sleep(0))
        try:
            caller_out, callee_out = await asyncio.gather(
                calling.output(DEADLINE * 2), answering.output(DEADLINE * 2)
            )
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        (self.tmp / "call.out").write_text(caller_out + callee_out)  # for a failure's reader
        caller = Side.parse(caller_out, self.tmp / "caller.wav")
        callee = Side.parse(callee_out, self.tmp / "callee.wav")
        # The tone arrives both ways.
        assert caller.frequency == pytest.approx(TONES[CALLEE], abs=5), caller
        assert callee.frequency == pytest.approx(TONES[CALLER], abs=5), callee
        return caller, callee


@contextlib.asynccontextmanager
async def calls_lab(
    nat: NatType,
    media: Literal["direct", "relay"],
    *,
    turn: bool,
    tmp: Path,
    sqlite_migrated: Path,
) -> AsyncIterator[CallsLab]:
    db = tmp / "natter.db"
    shutil.copyfile(sqlite_migrated, db)
    config = natterd_calls_config(tmp, db, media=media, turn=turn)
    password = tmp / "password"
    password.write_text("correct horse\n", encoding="utf-8")
    for jid in (CALLER, CALLEE):
        add = ["--config", str(config), "user", "add", jid, "--password-file", str(password)]
        assert await asyncio.to_thread(ctl_main, add) == 0
    async with nat_lab(nat, nat, tmp) as lab:
        process, _ = await start_natterd(lab, config, tmp)
        yield CallsLab(lab, config, tmp, process.pid)


async def test_cone_nats_call_directly_through_our_stun(
    sqlite_migrated: Path, tmp_path: Path
) -> None:
    async with calls_lab("cone", "direct", turn=False, tmp=tmp_path,
                         sqlite_migrated=sqlite_migrated) as lab:  # fmt: skip
        caller, callee = await lab.call()
        for side, peer in ((caller, 2), (callee, 1)):
            # Our host socket (a server-reflexive candidate pairs as its base) to the peer
            # NAT's mapping, which our STUN told it: no relay on the way.
            assert side.local[0] == "host", side.line
            assert side.remote[0] in ("srflx", "prflx"), side.line
            assert side.remote[1] == wan_ip(peer), side.line
        stun = (await lab.stats())["stun"]
        assert stun["relayed_packets"] == 0, stun


async def test_symmetric_nats_call_through_our_turn(sqlite_migrated: Path, tmp_path: Path) -> None:
    async with calls_lab("symmetric", "direct", turn=True, tmp=tmp_path,
                         sqlite_migrated=sqlite_migrated) as lab:  # fmt: skip
        caller, callee = await lab.call()
        for side in (caller, callee):
            assert "relay" in (side.local[0], side.remote[0]), side.line
        # Our TURN carried the media: about 50 packets a second each way.
        stun = (await lab.stats())["stun"]
        assert stun["relayed_packets"] > 2 * 50 * (SECONDS - 1), stun


def counting_rules(ports: range) -> str:
    """nftables rules counting, per relay port and direction, RTP and RTCP packets (RFC 7983:
    first byte 128-191; RFC 5761: RTCP's packet type 192-223, RTP's anything else)."""
    rules: dict[str, list[str]] = {"input": [], "output": []}
    for port in ports:
        for chain, match in (("input", "dport"), ("output", "sport")):
            for kind, type_match in (("rtcp", "192-223"), ("rtp", "!= 192-223")):
                rules[chain].append(
                    f"udp {match} {port} @th,64,8 128-191 @th,72,8 {type_match}"
                    f' counter comment "{chain} {kind} {port}"'
                )
    chains = "\n".join(
        f"  chain {chain} {{\n    type filter hook {chain} priority 0; policy accept;\n    "
        + "\n    ".join(lines)
        + "\n  }"
        for chain, lines in rules.items()
    )
    return f"table inet calls {{\n{chains}\n}}\n"


def read_counters(lab: NatLab) -> dict[tuple[str, str, int], int]:
    """(chain, rtp|rtcp, port) → packets, from the rules of :func:`counting_rules`."""
    listing = json.loads(lab.sh(lab.pub, "nft", "-j", "list", "table", "inet", "calls"))
    counts = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            chain, kind, port = rule["comment"].split()
            [counter] = [e["counter"] for e in rule["expr"] if "counter" in e]
            counts[(chain, kind, int(port))] = counter["packets"]
    return counts


async def test_symmetric_nats_call_through_the_relay(sqlite_migrated: Path, tmp_path: Path) -> None:
    relay_ports = range(CALL_RELAY_PORTS[0], CALL_RELAY_PORTS[1] + 1)
    async with calls_lab("symmetric", "relay", turn=True, tmp=tmp_path,
                         sqlite_migrated=sqlite_migrated) as lab:  # fmt: skip
        lab.lab.sh(lab.lab.pub, "nft", "-f", "-", stdin=counting_rules(relay_ports))
        sockets: set[tuple[int, str]] = set()  # (port, owner) of UDP sockets in the range

        async def watch_sockets() -> None:
            while True:
                out = lab.lab.sh(
                    lab.lab.pub, "ss", "-Huanp",
                    f"( sport >= :{relay_ports[0]} and sport <= :{relay_ports[-1]} )",
                )  # fmt: skip
                for line in out.splitlines():
                    local = line.split()[3]
                    owner = re.search(r"pid=(\d+)", line)
                    sockets.add((int(local.rpartition(":")[2]), owner[1] if owner else "?"))
                await asyncio.sleep(0.1)

        caller, callee = await lab.call(during=watch_sockets)
        # Each client's media went to its own leg at the relay's public address.
        legs = {caller.remote[2], callee.remote[2]}
        assert len(legs) == 2, (caller.line, callee.line)
        for side in (caller, callee):
            assert side.remote[1] == SERVER_IP and side.remote[2] in relay_ports, side.line
        # The relay held exactly those two sockets (one per leg), both natterd's ...
        assert sockets == {(port, str(lab.natterd_pid)) for port in legs}, sockets
        # ... and each carried RTP and RTCP, in and out; nothing else in the range did.
        counts = read_counters(lab.lab)
        for port in relay_ports:
            for chain in ("input", "output"):
                for kind in ("rtp", "rtcp"):
                    packets = counts[(chain, kind, port)]
                    if port in legs:
                        assert packets > 0, (port, chain, kind, counts)
                    else:
                        assert packets == 0, (port, chain, kind, counts)
