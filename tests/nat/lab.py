"""A NAT lab in network namespaces: two clients, each behind its own NAT, and a public network.

```
 c1 198.19.1.2 ── lan [nat1 198.18.0.11] wan ─┐
                                              ├─ br0 [pub 198.18.0.1, 198.18.0.2]  STUN/TURN
 c2 198.19.2.2 ── lan [nat2 198.18.0.12] wan ─┘
```

Only benchmarking addresses (198.18.0.0/15) are used, and only inside namespaces the lab
creates; nothing is routed to the host or beyond. ``pub`` runs either ``natterd stun`` (or
coturn) for the STUN/TURN tests, or a whole natterd (XMPP, STUN/TURN, media relay) for the
calls of test_calls_nat.py. ``NatLab`` removes everything it made, even when the test fails,
and kills every process it started inside (a namespace with a process in it would outlive
``ip netns del``). See /work/shared/notes/nat-lab.md for why the NAT routers
drop unsolicited traffic to themselves and why ``pub`` routes by default into a silent sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).with_name("agent.py")
PYTHON = REPO / ".venv" / "bin" / "python"
NATTERD = REPO / ".venv" / "bin" / "natterd"

NatType = Literal["cone", "symmetric"]

SERVER_IP = "198.18.0.1"
SERVER_IP2 = "198.18.0.2"  # a second public address, to tell NAT types apart
STUN_PORT = 3478
SINK_HOP = "198.18.254.2"  # pub's default gateway: a fake neighbour that swallows everything
SECRET = "nat lab secret"
REALM = "natter.test"


def wan_ip(n: int) -> str:
    return f"198.18.0.{10 + n}"


def client_ip(n: int) -> str:
    return f"198.19.{n}.2"


def unavailable_reason() -> str | None:
    """Why this machine cannot build the lab, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 iptables)"
    name = f"natprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    try:
        rule = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE", "--random-fully"]
        nat = subprocess.run(["ip", "netns", "exec", name, *rule], capture_output=True, text=True)
        if nat.returncode != 0:
            return f"iptables NAT does not work here: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class NatLab:
    """The namespaces (names unique to this process) and the processes started in them."""

    nat_types: tuple[NatType, NatType]
    tmp: Path
    """Logs and configuration files."""
    prefix: str = field(default_factory=lambda: f"nl{os.getpid()}{secrets.token_hex(2)}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[asyncio.subprocess.Process | subprocess.Popen[bytes]] = field(
        default_factory=list
    )
    agents: int = 0

    @property
    def pub(self) -> str:
        return f"{self.prefix}pub"

    def nat(self, n: int) -> str:
        return f"{self.prefix}nat{n}"

    def client(self, n: int) -> str:
        return f"{self.prefix}c{n}"

    # -- building and tearing down -------------------------------------------------------------

    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def iptables(self, ns: str, *args: str) -> None:
        run(["ip", "netns", "exec", ns, "iptables", *args])

    def sysctl(self, ns: str, setting: str) -> None:
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting])

    def add_namespace(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")

    def build(self) -> None:
        pub = self.pub
        self.add_namespace(pub)
        self.ip(pub, "link", "add", "name", "br0", "type", "bridge")
        self.ip(pub, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        self.ip(pub, "addr", "add", f"{SERVER_IP2}/24", "dev", "br0")
        self.ip(pub, "link", "set", "br0", "up")
        # The silent sink: a default route to a neighbour that exists only as an ARP entry.
        self.ip(pub, "link", "add", "name", "sink", "type", "veth", "peer", "name", "sinkpeer")
        self.ip(pub, "addr", "add", "198.18.254.1/24", "dev", "sink")
        self.ip(pub, "link", "set", "sink", "up")
        self.ip(pub, "link", "set", "sinkpeer", "up")
        self.ip(
            pub,
            "neigh",
            "add",
            SINK_HOP,
            "lladdr",
            "02:00:00:00:fe:02",
            "dev",
            "sink",
            "nud",
            "permanent",
        )
        self.ip(pub, "route", "add", "default", "via", SINK_HOP, "dev", "sink")
        for n, nat_type in enumerate(self.nat_types, start=1):
            nat, client = self.nat(n), self.client(n)
            self.add_namespace(nat)
            self.add_namespace(client)
            self.ip(
                pub,
                "link",
                "add",
                "name",
                f"n{n}",
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                nat,
            )
            self.ip(pub, "link", "set", f"n{n}", "master", "br0", "up")
            self.ip(
                nat,
                "link",
                "add",
                "name",
                "lan",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                client,
            )
            self.ip(nat, "addr", "add", f"{wan_ip(n)}/24", "dev", "wan")
            self.ip(nat, "addr", "add", f"198.19.{n}.1/24", "dev", "lan")
            self.ip(nat, "link", "set", "wan", "up")
            self.ip(nat, "link", "set", "lan", "up")
            self.sysctl(nat, "net.ipv4.ip_forward=1")
            masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
            if nat_type == "symmetric":
                masquerade.append("--random-fully")
            self.iptables(nat, *masquerade)
            self.iptables(nat, "-A", "INPUT", "-i", "wan", "-j", "DROP")
            self.ip(client, "addr", "add", f"{client_ip(n)}/24", "dev", "eth0")
            self.ip(client, "link", "set", "eth0", "up")
            self.ip(client, "route", "add", "default", "via", f"198.19.{n}.1")

    async def teardown(self) -> None:
        for process in reversed(self.processes):
            await stop_process(process)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces.clear()

    # -- processes inside ----------------------------------------------------------------------

    def netns_argv(self, ns: str, argv: Sequence[str | Path]) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def popen(self, ns: str, argv: Sequence[str | Path], log: Path) -> subprocess.Popen[bytes]:
        """A long-running process (a server) in ``ns``, its output going to ``log``."""
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.netns_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    async def agent(self, ns: str, *args: str) -> Agent:
        """``agent.py`` in ``ns``, driven line by line over its stdin and stdout."""
        self.agents += 1
        log = self.tmp / f"agent{self.agents}-{ns.removeprefix(self.prefix)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *self.netns_argv(ns, [PYTHON, AGENT, *args]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.processes.append(process)
        return Agent(ns, process, log)

    async def probe(self, n: int, servers: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """The mappings client ``n``'s NAT gives one socket towards each server (STUN)."""
        args = [f"{host}:{port}" for host, port in servers]
        agent = await self.agent(self.client(n), "probe", *args)
        result = await agent.read(timeout=15)
        await agent.finish()
        return [(host, port) for host, port in result["mapped"]]

    async def wait_udp_listening(
        self, ns: str, port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 15
    ) -> None:
        await self.wait_listening(ns, "udp", port, process, log, timeout)

    async def wait_listening(
        self,
        ns: str,
        protocol: Literal["udp", "tcp"],
        port: int,
        process: subprocess.Popen[bytes],
        log: Path,
        timeout: float = 15,
    ) -> None:
        flags = "-Hlun" if protocol == "udp" else "-Hltn"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited ({process.returncode}):\n{tail(log)}")
            out = self.sh(ns, "ss", flags, f"sport = :{port}")
            if out.strip():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"server not listening on {protocol}/{port} after {timeout}s:\n{tail(log)}"
        )

    def sh(self, ns: str, *argv: str, stdin: str | None = None) -> str:
        """The output of a short command in ``ns`` (an error if it fails)."""
        done = subprocess.run(
            self.netns_argv(ns, argv), input=stdin, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {ns}: {done.stderr.strip()}")
        return done.stdout

    async def spawn(self, ns: str, argv: Sequence[str | Path], log: Path) -> Command:
        """A command in ``ns`` whose stdout the test reads (stderr goes to ``log``)."""
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *self.netns_argv(ns, argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.processes.append(process)
        return Command(ns, process, log)


@dataclass
class Agent:
    """One ``agent.py`` process: JSON lines in, JSON lines out."""

    ns: str
    process: asyncio.subprocess.Process
    log: Path

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"agent in {self.ns}: no answer in {timeout}s") from None
        if not line:
            stderr = await self.stderr()
            raise AssertionError(f"agent in {self.ns} exited without answering:\n{stderr}")
        result: dict[str, Any] = json.loads(line)
        return result

    def write(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")

    async def finish(self, timeout: float = 10) -> None:
        """Close stdin (the agent's signal to stop) and wait for it to exit."""
        assert self.process.stdin is not None
        if not self.process.stdin.is_closing():
            self.process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)

    async def stderr(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        return tail(self.log)


@dataclass
class Command:
    """A command started with :meth:`NatLab.spawn`."""

    ns: str
    process: asyncio.subprocess.Process
    log: Path

    async def output(self, timeout: float) -> str:
        """Its stdout once it exits successfully (an AssertionError with its log otherwise)."""
        try:
            out, _ = await asyncio.wait_for(self.process.communicate(), timeout)
        except TimeoutError:
            await stop_process(self.process)
            raise AssertionError(f"{self.ns}: not done in {timeout}s:\n{tail(self.log)}") from None
        if self.process.returncode != 0:
            raise AssertionError(
                f"{self.ns}: exit {self.process.returncode}:\n{out.decode()}{tail(self.log)}"
            )
        return out.decode()


async def stop_process(process: asyncio.subprocess.Process | subprocess.Popen[bytes]) -> None:
    """Terminate a process we started (its whole session), then kill it if it lingers."""
    if process.returncode is not None:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if isinstance(process, subprocess.Popen):
                if process.poll() is not None:
                    return
            elif process.returncode is not None:
                return
            await asyncio.sleep(0.02)
    if isinstance(process, subprocess.Popen):
        process.wait(1)
    else:
        await asyncio.wait_for(process.wait(), 1)


def run(argv: Sequence[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


@contextlib.asynccontextmanager
async def nat_lab(first: NatType, second: NatType, tmp: Path) -> AsyncIterator[NatLab]:
    lab = NatLab((first, second), tmp)
    try:
        lab.build()
        yield lab
    finally:
        await lab.teardown()


# -- the STUN/TURN server in pub ----------------------------------------------------------------


def natterd_has_stun() -> bool:
    help_text = subprocess.run([NATTERD, "--help"], capture_output=True, text=True).stdout
    return NATTERD.exists() and " stun " in help_text.replace("{", " ").replace(",", " ")


def natterd_config(tmp: Path) -> Path:
    path = tmp / "natterd.toml"
    path.write_text(
        f"""
[server]
data_dir = "{tmp / "data"}"

[logging]
level = "debug"

[stun]
enabled = true
host = ["{SERVER_IP}", "{SERVER_IP2}"]
udp_port = {STUN_PORT}
tcp_port = {STUN_PORT}
tls_port = 0
realm = "{REALM}"
secret = "{SECRET}"
relay_host = "{SERVER_IP}"
relay_min_port = 49152
relay_max_port = 49999
allowed_peers = ["198.18.0.0/15"]
"""
    )
    return path


def coturn_config(tmp: Path) -> Path:
    path = tmp / "turnserver.conf"
    path.write_text(
        f"""
listening-ip={SERVER_IP}
listening-ip={SERVER_IP2}
listening-port={STUN_PORT}
relay-ip={SERVER_IP}
min-port=49152
max-port=49999
realm={REALM}
use-auth-secret
static-auth-secret={SECRET}
fingerprint
no-tls
no-dtls
no-cli
no-tcp-relay
allowed-peer-ip=198.18.0.0-198.19.255.255
userdb={tmp / "turndb"}
pidfile={tmp / "turnserver.pid"}
log-file={tmp / "turnserver.log"}
simple-log
"""
    )
    return path


async def start_stun_server(lab: NatLab, kind: str, tmp: Path) -> Path:
    """Our server (``natterd stun``) or coturn in ``pub``; returns its log file."""
    log = tmp / f"{kind}.log"
    if kind == "natterd":
        argv: list[str | Path] = [NATTERD, "--config", natterd_config(tmp), "stun"]
    else:
        argv = ["turnserver", "-c", coturn_config(tmp)]
    process = lab.popen(lab.pub, argv, log)
    await lab.wait_udp_listening(lab.pub, STUN_PORT, process, log)
    return log


# -- natterd with calls in pub: XMPP, STUN/TURN and the media relay ------------------------------

NATTERCTL = REPO / ".venv" / "bin" / "natterctl"
DOMAIN = "localhost"
C2S_PORT = 5222
TURN_PORTS = (49152, 49999)
CALL_RELAY_PORTS = (50000, 50009)
"""The media relay's UDP port range (``relay_port_range``): apart from TURN's, so that every
socket in it is an anchored leg's."""


def natterd_calls_config(
    tmp: Path, db: Path, *, media: Literal["direct", "relay"], turn: bool
) -> Path:
    """A whole natterd in pub: c2s on the public address, STUN/TURN advertised through
    XEP-0215, the relay (in ``relay`` mode) on ``CALL_RELAY_PORTS`` at the public address.
    The clients' ``natterctl`` reads the same file (c2s address, the generated certificate)."""
    path = tmp / "natterd.toml"
    path.write_text(
        f"""
[server]
domain = "{DOMAIN}"
data_dir = "{tmp / "data"}"

[storage]
url = "sqlite+aiosqlite:///{db}"

[logging]
level = "info"

[c2s]
host = "{SERVER_IP}"
port = {C2S_PORT}
direct_tls_port = 0

[http]
enabled = false

[stun]
enabled = true
host = ["{SERVER_IP}"]
udp_port = {STUN_PORT}
tcp_port = 0
tls_port = 0
turn = {"true" if turn else "false"}
realm = "{REALM}"
secret = "{SECRET}"
relay_host = "{SERVER_IP}"
relay_min_port = {TURN_PORTS[0]}
relay_max_port = {TURN_PORTS[1]}
allowed_peers = ["198.18.0.0/15"]

[modules.jingle]
media = "{media}"
relay_port_range = "{CALL_RELAY_PORTS[0]}-{CALL_RELAY_PORTS[1]}"
relay_public_address = "{SERVER_IP}"
"""
    )
    return path


async def start_natterd(
    lab: NatLab, config: Path, tmp: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """``natterd run`` in pub, listening for clients and STUN; the process and its log."""
    log = tmp / "natterd.log"
    process = lab.popen(lab.pub, [NATTERD, "--config", config, "run"], log)
    await lab.wait_listening(lab.pub, "tcp", C2S_PORT, process, log, timeout=60)
    await lab.wait_listening(lab.pub, "udp", STUN_PORT, process, log, timeout=60)
    return process, log
