"""STUN/TURN benchmark on loopback: natterd's server against coturn, in one run.

``python -m bench.stun`` starts each server in turn with a private configuration and measures

* **bindings**: STUN Binding requests/s, closed loop (``--window`` outstanding requests on each
  of ``--sockets`` UDP sockets per worker); every response is checked: its transaction id must
  be one in flight on that socket and its XOR-MAPPED-ADDRESS must be the socket's own address;
* **relay**: TURN channels carrying ``--streams`` media-like flows (``--pps`` packets/s each
  way, 50 by default: 20 ms audio) between a TURN client and a plain UDP peer: relayed
  packets/s, loss and the one-way delay through the relay.

The clients are raw asyncio UDP sockets with a minimal STUN/TURN codec of their own (no
library, nothing shared with the server under test), spread over ``--procs`` worker processes.
bench/README.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # `python bench/stun.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import (
    CPU_WARNING,
    OTHERS_WARNING,
    _out,
    _warn,
    cpu_seconds,
    machine_cpu,
    percentiles,
    process_cpu,
    raise_nofile_limit,
    to_toml,
)

P = TypeVar("P", bound=asyncio.BaseProtocol)
REALM = "bench.natter"
BUFFER = 4 << 20  # socket buffers: loss must be the server's, not the generator's
SETTLE = 1.0  # seconds after the last packet for late ones to arrive

# ---------------------------------------------------------------------------------------------
# A minimal STUN/TURN codec (RFC 8489, RFC 8656): just what the benchmark sends and checks

MAGIC = 0x2112A442
MAGIC_BYTES = struct.pack("!I", MAGIC)
BINDING = 0x0001
ALLOCATE = 0x0003
REFRESH = 0x0004
CHANNEL_BIND = 0x0009
DATA_INDICATION = 0x0117
SUCCESS = 0x0100
ERROR = 0x0110

USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM_ATTR = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020
FINGERPRINT = 0x8028

BINDING_SUCCESS = struct.pack("!H", BINDING | SUCCESS)


def encode(
    method: int, txid: bytes, attrs: Sequence[tuple[int, bytes]], key: bytes | None = None
) -> bytes:
    body = b""
    for kind, value in attrs:
        body += struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)
    if key is not None:
        header = struct.pack("!HH", method, len(body) + 24) + MAGIC_BYTES + txid
        mac = hmac.new(key, header + body, hashlib.sha1).digest()
        body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
    return struct.pack("!HH", method, len(body)) + MAGIC_BYTES + txid + body


def parse(data: bytes) -> tuple[int, bytes, dict[int, bytes]] | None:
    """(message type, transaction id, attributes) of a STUN message, else None."""
    if len(data) < 20 or data[0] & 0xC0 or data[4:8] != MAGIC_BYTES:
        return None
    kind, length = struct.unpack_from("!HH", data)
    if 20 + length > len(data):
        return None
    attrs: dict[int, bytes] = {}
    at = 20
    while at + 4 <= 20 + length:
        attr, size = struct.unpack_from("!HH", data, at)
        attrs.setdefault(attr, data[at + 4 : at + 4 + size])
        at += 4 + size + (-size % 4)
    return kind, data[8:20], attrs


def xor_address(value: bytes, txid: bytes) -> tuple[str, int]:
    family, port = struct.unpack_from("!xBH", value)
    port ^= MAGIC >> 16
    if family == 1:
        raw = bytes(a ^ b for a, b in zip(value[4:8], MAGIC_BYTES, strict=True))
    else:
        raw = bytes(a ^ b for a, b in zip(value[4:20], MAGIC_BYTES + txid, strict=True))
    return str(ipaddress.ip_address(raw)), port


def encode_xor_address(host: str, port: int) -> bytes:
    packed = ipaddress.IPv4Address(host).packed
    xored = bytes(a ^ b for a, b in zip(packed, MAGIC_BYTES, strict=True))
    return struct.pack("!xBH", 1, port ^ (MAGIC >> 16)) + xored


def turn_credentials(secret: str, user: str, ttl: int) -> tuple[str, str]:
    """The coturn ``use-auth-secret`` scheme (TURN REST API), computed here independently."""
    username = f"{int(time.time()) + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


# ---------------------------------------------------------------------------------------------
# The servers


@dataclass
class Server:
    """One STUN/TURN server as a subprocess of ours, with a private configuration."""

    kind: str  # "natterd" | "coturn"
    port: int
    secret: str
    allocations: int
    threads: int | None = None
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="natter-stun-bench-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.dir / f"{self.kind}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        if self.kind == "natterd":
            tables: dict[str, dict[str, Any]] = {
                "server": {"data_dir": str(self.dir / "data")},
                "logging": {"level": "warning"},
                "stun": {
                    "enabled": True,
                    "host": ["127.0.0.1"],
                    "udp_port": self.port,
                    "tcp_port": 0,
                    "tls_port": 0,
                    "realm": REALM,
                    "secret": self.secret,
                    "relay_host": "127.0.0.1",
                    "relay_min_port": 40000,
                    "relay_max_port": 44999,
                    "max_allocations": self.allocations,
                    "max_allocations_per_user": self.allocations,
                    "allowed_peers": ["127.0.0.1/32"],
                    "rate": 0,  # no per-source rate limit: the benchmark is one source
                    "workers": self.threads or 1,
                },
            }
            config = self.dir / "natterd.toml"
            config.write_text(to_toml(tables))
            return [sys.executable, "-m", "xmpp_server", "--config", str(config), "stun"]
        lines = [
            "listening-ip=127.0.0.1",
            f"listening-port={self.port}",
            "relay-ip=127.0.0.1",
            "min-port=45000",
            "max-port=49999",
            f"realm={REALM}",
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            "no-tls",
            "no-dtls",
            "no-tcp",
            "no-tcp-relay",
            "no-cli",
            "allowed-peer-ip=127.0.0.1",
            "allow-loopback-peers",
            "total-quota=0",
            "user-quota=0",
            f"userdb={self.dir / 'turndb'}",
            f"pidfile={self.dir / 'turnserver.pid'}",
            f"log-file={self.dir / 'turnserver.log'}",
            "simple-log",
            "no-stdout-log",
        ]
        if self.threads:
            lines.append(f"relay-threads={self.threads}")
        config = self.dir / "turnserver.conf"
        config.write_text("\n".join(lines) + "\n")
        return ["turnserver", "-c", str(config)]

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(0.1)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} exited ({self.proc.returncode}):\n{self.tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not answer within 30 s:\n{self.tail()}")
                txid = os.urandom(12)
                sock.sendto(encode(BINDING, txid, []), ("127.0.0.1", self.port))
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    continue
                message = parse(data)
                if message and message[0] == BINDING | SUCCESS and message[1] == txid:
                    return

    def tail(self, size: int = 3000) -> str:
        text = ""
        for path in (self.log, self.dir / "turnserver.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-size:]
        return text

    def version(self) -> str:
        if self.kind == "natterd":
            return "natterd stun"
        out = subprocess.run(["turnserver", "--version"], capture_output=True, text=True)
        return f"coturn {out.stdout.strip() or '?'}" + (
            f" ({self.threads} relay threads)" if self.threads else ""
        )

    def stop(self, keep: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if keep:
            _warn(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Workers: one process each, set up, told when to start, report counters and samples


@dataclass(frozen=True)
class Job:
    scenario: str  # "bindings" | "relay"
    server: tuple[str, int]
    seconds: float
    sockets: int = 0
    window: int = 0
    streams: int = 0
    first_stream: int = 0
    pps: float = 50.0
    size: int = 172
    secret: str = ""
    client_host: str = "127.0.0.1"
    """Each relay level gets its own source address: coturn refuses a new allocation from the
    5-tuple of one deleted moments ago (437), and ephemeral ports do get reused."""


def worker_main(job: Job, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile_limit()
    try:
        result = asyncio.run(_worker(job, conn))
    except Exception as exc:  # reported to the parent, which stops the run
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send(result)


def _udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def _returning(protocol: P) -> Callable[[], P]:
    """A protocol factory for an existing protocol object."""
    return lambda: protocol


async def _worker(job: Job, conn: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    if job.scenario == "bindings":
        runner: BindingRun | RelayRun = BindingRun(job)
    else:
        runner = RelayRun(job)
    await runner.setup()
    conn.send({"ready": True})
    start_at: float = await loop.run_in_executor(None, conn.recv)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = cpu_seconds()
    wall0 = time.monotonic()
    await runner.run(start_at + job.seconds)
    cpu = cpu_seconds() - cpu0
    wall = time.monotonic() - wall0
    await asyncio.sleep(SETTLE)
    result = runner.result()
    result.update(cpu_s=cpu, wall_s=wall)
    await runner.close()
    return result


class BindingSocket(asyncio.DatagramProtocol):
    """``window`` Binding requests in flight on one socket; each answer checked, then replaced."""

    def __init__(self, run: BindingRun, sock: socket.socket) -> None:
        self.run = run
        self.sock = sock
        self.local: tuple[str, int] = sock.getsockname()
        self.inflight: dict[bytes, int] = {}  # transaction id -> send time (ns)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        txid = os.urandom(12)
        self.inflight[txid] = time.perf_counter_ns()
        assert self.transport is not None
        self.transport.sendto(b"\x00\x01\x00\x00" + MAGIC_BYTES + txid)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        run = self.run
        now = time.perf_counter_ns()
        sent = self.inflight.pop(data[8:20], None) if len(data) >= 20 else None
        if sent is None:
            run.unexpected += 1
            return
        if data[:2] != BINDING_SUCCESS or data[4:8] != MAGIC_BYTES or not self._mapped_ok(data):
            run.bad += 1
        elif run.measuring:
            run.ok += 1
            run.latency.append((now - sent) // 1000)
        if run.sending:
            self.send()

    def _mapped_ok(self, data: bytes) -> bool:
        at, end = 20, 20 + int.from_bytes(data[2:4])
        while at + 4 <= end:
            kind = int.from_bytes(data[at : at + 2])
            size = int.from_bytes(data[at + 2 : at + 4])
            if kind == XOR_MAPPED_ADDRESS:
                return xor_address(data[at + 4 : at + 4 + size], data[8:20]) == self.local
            at += 4 + size + (-size % 4)
        return False

    def expire(self, older_than_ns: int) -> None:
        """Requests unanswered for a second are lost (UDP): count them, send new ones."""
        for txid, sent in list(self.inflight.items()):
            if sent < older_than_ns:
                del self.inflight[txid]
                self.run.lost += 1
                if self.run.sending:
                    self.send()


class BindingRun:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.sockets: list[BindingSocket] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.ok = self.bad = self.lost = self.unexpected = 0
        self.latency = array("q")
        self.measuring = False
        self.sending = False

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.job.sockets):
            sock = _udp_socket()
            sock.connect(self.job.server)
            protocol = BindingSocket(self, sock)
            transport, _ = await loop.create_datagram_endpoint(_returning(protocol), sock=sock)
            self.sockets.append(protocol)
            self.transports.append(transport)

    async def run(self, end: float) -> None:
        self.measuring = self.sending = True
        for sock in self.sockets:
            for _ in range(self.job.window):
                sock.send()
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(0.1, end - now))
            cutoff = time.perf_counter_ns() - 1_000_000_000
            for sock in self.sockets:
                sock.expire(cutoff)
        self.measuring = self.sending = False

    def result(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bad": self.bad,
            "lost": self.lost,
            "unexpected": self.unexpected,
            "latency_us": self.latency.tobytes(),
        }

    async def close(self) -> None:
        for transport in self.transports:
            transport.close()


class TurnError(Exception):
    pass


class Stream(asyncio.DatagramProtocol):
    """One TURN allocation with a channel to the worker's peer socket."""

    CHANNEL = 0x4000

    def __init__(self, run: RelayRun, index: int) -> None:
        self.run = run
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[bytes, asyncio.Future[tuple[int, dict[int, bytes]]]] = {}
        self.relayed: tuple[str, int] = ("", 0)
        self.key = b""
        self.username = b""
        self.password = b""
        self.realm = b""
        self.nonce = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def request(
        self, method: int, attrs: list[tuple[int, bytes]], signed: bool = True
    ) -> dict[int, bytes]:
        assert self.transport is not None
        for _ in range(2):  # once more after a 401 / 438 with a new nonce
            txid = os.urandom(12)
            full = list(attrs)
            if signed:
                full += [(USERNAME, self.username), (REALM_ATTR, self.realm), (NONCE, self.nonce)]
            data = encode(method, txid, full, self.key if signed else None)
            future: asyncio.Future[tuple[int, dict[int, bytes]]]
            future = asyncio.get_running_loop().create_future()
            self.pending[txid] = future
            try:
                for delay in (0.5, 1.0, 2.0, 4.0):
                    self.transport.sendto(data)
                    try:
                        kind, answer = await asyncio.wait_for(asyncio.shield(future), delay)
                        break
                    except TimeoutError:
                        continue
                else:
                    raise TurnError(f"no answer to method {method:#x}")
            finally:
                self.pending.pop(txid, None)
            if (kind & 0x0110) == SUCCESS:
                return answer
            code = answer.get(ERROR_CODE, b"\0\0\0\0")
            status = code[2] * 100 + code[3]
            if status in (401, 438) and NONCE in answer:
                self.nonce = answer[NONCE]
                self.realm = answer.get(REALM_ATTR, self.realm)
                self.key = hashlib.md5(
                    self.username + b":" + self.realm + b":" + self.password
                ).digest()
                signed = True
                continue
            raise TurnError(
                f"method {method:#x}: error {status} {code[4:].decode(errors='replace')}"
            )
        raise TurnError(f"method {method:#x}: still unauthorised")

    async def setup(self, peer: tuple[str, int]) -> None:
        username, password = turn_credentials(self.run.job.secret, f"bench{self.index}", 3600)
        self.username, self.password = username.encode(), password.encode()
        answer = await self.request(
            ALLOCATE,
            [(REQUESTED_TRANSPORT, bytes([17, 0, 0, 0])), (LIFETIME, struct.pack("!I", 600))],
            signed=False,
        )
        if XOR_RELAYED_ADDRESS not in answer:
            raise TurnError("Allocate success without XOR-RELAYED-ADDRESS")
        self.relayed = xor_address(answer[XOR_RELAYED_ADDRESS], b"\0" * 12)
        await self.request(
            CHANNEL_BIND,
            [
                (CHANNEL_NUMBER, struct.pack("!HH", self.CHANNEL, 0)),
                (XOR_PEER_ADDRESS, encode_xor_address(*peer)),
            ],
        )

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] and 0x40 <= data[0] <= 0x7F:  # ChannelData from the relay
            length = int.from_bytes(data[2:4])
            self.run.received(1, data[4 : 4 + length])
            return
        message = parse(data)
        if message is None:
            self.run.garbage += 1
            return
        kind, txid, attrs = message
        if kind == DATA_INDICATION and DATA in attrs:
            self.run.received(1, attrs[DATA])
        elif (future := self.pending.get(txid)) is not None and not future.done():
            future.set_result((kind, attrs))

    async def close(self) -> None:
        if self.transport is None:
            return
        try:
            await asyncio.wait_for(self.request(REFRESH, [(LIFETIME, b"\0\0\0\0")]), 2)
        except (TurnError, TimeoutError):
            pass
        self.transport.close()


class Peer(asyncio.DatagramProtocol):
    def __init__(self, run: RelayRun) -> None:
        self.run = run

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.run.received(0, data)


class RelayRun:
    """``streams`` allocations paced at ``pps`` each way: client → relay → peer (direction 0)
    and peer → relay → client (direction 1). Packets carry stream, sequence and send time."""

    HEAD = struct.Struct("!IIq")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.streams: list[Stream] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.peer_transport: asyncio.DatagramTransport | None = None
        self.sent = [0, 0]
        self.offered = 0
        self.got = [0, 0]
        self.duplicates = 0
        self.garbage = 0
        self.latency = [array("q"), array("q")]
        self.seen: list[bytearray] = []
        self.pad = b"\0" * max(0, job.size - self.HEAD.size)

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        peer_transport, _ = await loop.create_datagram_endpoint(
            lambda: Peer(self), sock=_udp_socket()
        )
        self.peer_transport = peer_transport
        peer = peer_transport.get_extra_info("sockname")
        for i in range(self.job.streams):
            sock = _udp_socket(self.job.client_host)
            sock.connect(self.job.server)
            stream = Stream(self, self.job.first_stream + i)
            transport, _ = await loop.create_datagram_endpoint(_returning(stream), sock=sock)
            self.streams.append(stream)
            self.transports.append(transport)
        limit = asyncio.Semaphore(32)

        async def one(stream: Stream) -> None:
            async with limit:
                await stream.setup(peer)

        await asyncio.gather(*(one(s) for s in self.streams))
        packets = int(self.job.seconds * self.job.pps) + 1
        self.seen = [bytearray(packets * 2) for _ in self.streams]  # [seq*2 + direction]

    def received(self, direction: int, payload: bytes) -> None:
        if len(payload) < self.HEAD.size:
            self.garbage += 1
            return
        now = time.perf_counter_ns()
        stream, seq, sent = self.HEAD.unpack_from(payload)
        index = stream - self.job.first_stream
        if not 0 <= index < len(self.seen) or seq * 2 + 1 >= len(self.seen[index]):
            self.garbage += 1
            return
        slot = seq * 2 + direction
        if self.seen[index][slot]:
            self.duplicates += 1
            return
        self.seen[index][slot] = 1
        self.got[direction] += 1
        self.latency[direction].append((now - sent) // 1000)

    async def run(self, end: float) -> None:
        """Send every packet whose time has come; stream i is offset by i/S of the period and
        the return direction by half a period, so the load is spread evenly."""
        assert self.peer_transport is not None
        count = len(self.streams)
        period = 1.0 / self.job.pps
        start = time.monotonic()
        total = int(self.job.seconds * self.job.pps) * count
        self.offered = total * 2
        heads = [struct.pack("!HH", Stream.CHANNEL, self.job.size)] * count
        pack = self.HEAD.pack
        pad = self.pad
        peer_send = self.peer_transport.sendto
        sends = [s.transport.sendto for s in self.streams if s.transport is not None]
        relayed = [s.relayed for s in self.streams]
        first = self.job.first_stream
        k = [0, 0]  # next packet number per direction
        while k[0] < total or k[1] < total:
            now = time.monotonic()
            for direction in (0, 1):
                offset = direction * period / 2
                while k[direction] < total:
                    n = k[direction]
                    seq, i = divmod(n, count)
                    due = start + seq * period + i * period / count + offset
                    if due > now:
                        break
                    payload = pack(first + i, seq, time.perf_counter_ns()) + pad
                    if direction == 0:
                        sends[i](heads[i] + payload)
                    else:
                        peer_send(payload, relayed[i])
                    self.sent[direction] += 1
                    k[direction] = n + 1
            if now > end + 5:
                break  # hopelessly behind: report what was sent
            await asyncio.sleep(0.001)

    def result(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "offered": self.offered,
            "sent": self.sent,
            "received": self.got,
            "duplicates": self.duplicates,
            "garbage": self.garbage,
            "latency_us": [lat.tobytes() for lat in self.latency],
        }

    async def close(self) -> None:
        """Free the allocations (Refresh with lifetime 0), so the next level starts clean."""
        await asyncio.gather(*(s.close() for s in self.streams))
        if self.peer_transport is not None:
            self.peer_transport.close()


# ---------------------------------------------------------------------------------------------
# The parent


def udp_rcvbuf_errors() -> int | None:
    """The kernel's count of UDP datagrams dropped because a receive buffer was full (all
    sockets of the machine; the generator's have 4 MiB, so on loopback it is the server's)."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("Udp:"):
            counters = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(counters["RcvbufErrors"]) if "RcvbufErrors" in counters else None
    return None


def run_phase(jobs: list[Job], server_pid: int | None, timeout: float = 120) -> dict[str, Any]:
    """Start one worker per job, start them together, collect their results and CPU shares."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for job in jobs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(job, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("a worker did not get ready")
            message = pipe.recv()
            if "error" in message:
                raise RuntimeError(f"worker: {message['error']}")
        start_at = time.monotonic() + 0.2
        for pipe in pipes:
            pipe.send(start_at)
        time.sleep(max(0.0, start_at - time.monotonic()))
        server0, machine0, parent0 = tree_cpu(server_pid), machine_cpu(), cpu_seconds()
        drops0 = udp_rcvbuf_errors()
        wall0 = time.monotonic()
        time.sleep(max(0.0, start_at + jobs[0].seconds - time.monotonic()))
        server1, machine1, parent1 = tree_cpu(server_pid), machine_cpu(), cpu_seconds()
        wall = time.monotonic() - wall0
        results = []
        for pipe in pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("a worker did not report")
            message = pipe.recv()
            if "error" in message:
                raise RuntimeError(f"worker: {message['error']}")
            results.append(message)
        drops1 = udp_rcvbuf_errors()  # after the workers' settling time: late drops count too
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    def share(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or wall <= 0 else round((b - a) / wall, 3)

    server = share(server0, server1)
    machine = share(machine0, machine1)
    own = sum(r["cpu_s"] for r in results) + (parent1 - parent0)
    others = None
    if server is not None and machine is not None:
        others = round(max(0.0, machine - server - own / wall), 3)
    cpu = {
        "seconds": round(wall, 3),
        "server_cpu": server,
        "worker_cpu": [round(r["cpu_s"] / r["wall_s"], 3) if r["wall_s"] else 0.0 for r in results],
        "other_cpu": others,
        "machine_cpu": machine,
    }
    drops = drops1 - drops0 if drops0 is not None and drops1 is not None else None
    return {"workers": results, "cpu": cpu, "rcvbuf_drops": drops}


def merged_latency(parts: list[bytes]) -> dict[str, float | None]:
    samples = array("q")
    for part in parts:
        samples.frombytes(part)
    return percentiles(samples)


def measure_bindings(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    jobs = [
        Job("bindings", ("127.0.0.1", server.port), args.seconds, args.sockets, args.window)
        for _ in range(args.procs)
    ]
    phase = run_phase(jobs, server.pid)
    workers = phase["workers"]
    ok = sum(w["ok"] for w in workers)
    return {
        "requests_per_s": round(ok / phase["cpu"]["seconds"], 1),
        "verified": ok,
        "bad": sum(w["bad"] for w in workers),
        "lost": sum(w["lost"] for w in workers),
        "unexpected": sum(w["unexpected"] for w in workers),
        "latency_ms": merged_latency([w["latency_us"] for w in workers]),
        "in_flight": args.procs * args.sockets * args.window,
        "rcvbuf_drops": phase["rcvbuf_drops"],
        "cpu": phase["cpu"],
    }


def measure_relay(
    args: argparse.Namespace, server: Server, streams: int, level: int
) -> dict[str, Any]:
    per, extra = divmod(streams, args.procs)
    jobs, first = [], 0
    for i in range(args.procs):
        count = per + (1 if i < extra else 0)
        if count:
            jobs.append(
                Job(
                    "relay",
                    ("127.0.0.1", server.port),
                    args.seconds,
                    streams=count,
                    first_stream=first,
                    pps=args.pps,
                    size=args.size,
                    secret=server.secret,
                    client_host=f"127.0.0.{10 + level}",
                )
            )
            first += count
    phase = run_phase(jobs, server.pid)
    workers = phase["workers"]
    sent = [sum(w["sent"][d] for w in workers) for d in (0, 1)]
    got = [sum(w["received"][d] for w in workers) for d in (0, 1)]
    offered = sum(w["offered"] for w in workers)
    seconds = phase["cpu"]["seconds"]
    return {
        "streams": streams,
        "offered_pps": round(offered / args.seconds, 1),
        "sent_pps": round(sum(sent) / seconds, 1),
        "relayed_pps": round(sum(got) / seconds, 1),
        "sent": sent,
        "received": got,
        "loss": [round(1 - g / s, 5) if s else None for g, s in zip(got, sent, strict=True)],
        "duplicates": sum(w["duplicates"] for w in workers),
        "garbage": sum(w["garbage"] for w in workers),
        "delay_ms": merged_latency([w["latency_us"][d] for w in workers for d in (0, 1)]),
        "rcvbuf_drops": phase["rcvbuf_drops"],
        "cpu": phase["cpu"],
    }


def phase_warnings(name: str, figures: dict[str, Any]) -> list[str]:
    cpu = figures["cpu"]
    out = [
        f"{name}: worker {i} used {share:.0%} of a core: the figure may measure the generator, "
        "not the server"
        for i, share in enumerate(cpu["worker_cpu"])
        if share > CPU_WARNING
    ]
    if cpu["other_cpu"] is not None and cpu["other_cpu"] > OTHERS_WARNING:
        out.append(
            f"{name}: other processes used {cpu['other_cpu']:.0%} of a core: the machine is "
            "shared, the figures are unreliable"
        )
    cores = os.cpu_count() or 1
    if cpu["machine_cpu"] is not None and cpu["machine_cpu"] > 0.9 * cores:
        out.append(
            f"{name}: all {cores} cores were busy ({cpu['machine_cpu']:.1f}): server and "
            "generator competed for the CPU, so the figure is a lower bound for that server"
        )
    if "offered_pps" in figures and figures["sent_pps"] < 0.95 * figures["offered_pps"]:
        out.append(
            f"{name}: the generator sent {figures['sent_pps']:,.0f} of the "
            f"{figures['offered_pps']:,.0f} packets/s offered: it is saturated"
        )
    if figures.get("bad") or figures.get("unexpected"):
        out.append(f"{name}: {figures['bad']} bad and {figures['unexpected']} unexpected responses")
    return out


def tree_cpu(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and its children: natterd's ``[stun] workers`` are processes."""
    total = process_cpu(pid)
    if pid is None or total is None:
        return total
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            total += process_cpu(int(stat.parent.name)) or 0.0
    return total


def bench_server(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    streams = max(args.streams, default=0)
    server = Server(
        kind,
        free_udp_port(),
        secrets.token_urlsafe(16),
        streams + 16,
        args.coturn_threads if kind == "coturn" else args.natterd_workers,
    )
    server.start()
    try:
        result: dict[str, Any] = {"server": server.version(), "relay": []}
        if "bindings" in args.scenarios:
            result["bindings"] = measure_bindings(args, server)
        if "relay" in args.scenarios:
            for level, count in enumerate(args.streams):
                result["relay"].append(measure_relay(args, server, count, level))
                time.sleep(0.5)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{kind} died during the run:\n{server.tail()}")
        return result
    finally:
        server.stop(args.keep)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cpu(figures: dict[str, Any]) -> str:
    cpu = figures["cpu"]
    workers = "+".join(_pct(x) for x in cpu["worker_cpu"])
    return f"{_pct(cpu['server_cpu'])} / {workers}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def print_report(report: dict[str, Any]) -> None:
    servers: dict[str, dict[str, Any]] = report["servers"]
    names = list(servers)
    args = report["options"]
    _out(
        f"STUN/TURN on loopback, {args['procs']} worker processes, {args['seconds']:g} s per "
        "measurement; " + ", ".join(servers[n]["server"] for n in names)
    )
    rows: list[list[str]] = [["", *names]]
    if len(names) == 2:
        rows[0].append(f"{names[0]}/{names[1]}")

    def row(label: str, values: list[str], ratio: str | None = None) -> None:
        rows.append([label, *values] + ([ratio or ""] if len(names) == 2 else []))

    def figures(get: Any) -> list[Any]:
        return [get(servers[n]) for n in names]

    if "bindings" in args["scenarios"]:
        b = figures(lambda s: s["bindings"])
        rates = [x["requests_per_s"] for x in b]
        row(
            f"bindings/s ({b[0]['in_flight']} in flight)",
            [f"{r:,.0f}" for r in rates],
            _ratio(*rates) if len(rates) == 2 else None,
        )
        row(
            "  latency p50 / p99 ms",
            [f"{x['latency_ms']['p50'] or 0:.2f} / {x['latency_ms']['p99'] or 0:.2f}" for x in b],
        )
        row("  verified / bad / lost", [f"{x['verified']:,} / {x['bad']} / {x['lost']}" for x in b])
        row("  kernel drops (rcvbuf full)", [_count(x["rcvbuf_drops"]) for x in b])
        row("  CPU server / workers", [_cpu(x) for x in b])
    for level in range(len(args["streams"])):
        r = figures(lambda s, level=level: s["relay"][level])
        streams = r[0]["streams"]
        rates = [x["relayed_pps"] for x in r]
        row(
            f"relay: {streams} streams, pkts/s",
            [f"{x:,.0f} of {y['offered_pps']:,.0f}" for x, y in zip(rates, r, strict=True)],
            _ratio(*rates) if len(rates) == 2 else None,
        )
        row(
            "  loss out / back",
            [" / ".join("-" if v is None else f"{v:.2%}" for v in x["loss"]) for x in r],
        )
        row(
            "  delay p50 / p99 / max ms",
            [
                f"{x['delay_ms']['p50'] or 0:.2f} / {x['delay_ms']['p99'] or 0:.2f} / "
                f"{x['delay_ms']['max'] or 0:.1f}"
                for x in r
            ],
        )
        row("  kernel drops (rcvbuf full)", [_count(x["rcvbuf_drops"]) for x in r])
        row("  CPU server / workers", [_cpu(x) for x in r])
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    for line in rows:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        _out("  " + "  ".join(cells).rstrip())
    _out("  (CPU in % of one core; delay is one-way through the relay, generator included)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stun", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--server", choices=["both", "natterd", "coturn"], default="both")
    parser.add_argument(
        "--scenarios",
        default="bindings,relay",
        type=lambda s: [x for x in s.split(",") if x],
        help="bindings, relay or both (default)",
    )
    parser.add_argument("--procs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    parser.add_argument("--sockets", type=int, default=8, help="binding sockets per worker")
    parser.add_argument("--window", type=int, default=4, help="bindings in flight per socket")
    parser.add_argument(
        "--streams",
        default=[50, 200],
        type=lambda s: [int(x) for x in s.split(",")],
        help="relay stream counts, one measurement each (default 50,200)",
    )
    parser.add_argument("--pps", type=float, default=50.0, help="packets/s per stream and way")
    parser.add_argument("--size", type=int, default=172, help="relayed payload bytes (RTP+G.711)")
    parser.add_argument(
        "--coturn-threads", type=int, help="coturn relay-threads (its default: one per core)"
    )
    parser.add_argument(
        "--natterd-workers",
        type=int,
        default=1,
        help="natterd's [stun] workers (default 1: with the generator on the same 2 cores, a"
        " second process cost more CPU per request than it saved)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' directories and logs"
    )
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - {"bindings", "relay"}
    if unknown or not args.scenarios:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown)) or '(none)'}")
    if args.procs < 1 or args.sockets < 1 or args.window < 1 or min(args.streams) < 1:
        parser.error("--procs, --sockets, --window and --streams must be positive")
    if args.size < RelayRun.HEAD.size:
        parser.error(f"--size must be at least {RelayRun.HEAD.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = ["natterd", "coturn"] if args.server == "both" else [args.server]
    if "coturn" in kinds and shutil.which("turnserver") is None:
        _warn("coturn is not installed (apt-get install coturn): measuring natterd alone")
        kinds.remove("coturn")
        if not kinds:
            return 2
    if "relay" not in args.scenarios:
        args.streams = []
    report: dict[str, Any] = {
        "options": {
            "procs": args.procs,
            "seconds": args.seconds,
            "scenarios": args.scenarios,
            "sockets": args.sockets,
            "window": args.window,
            "streams": args.streams,
            "pps": args.pps,
            "size": args.size,
        },
        "servers": {},
    }
    try:
        for kind in kinds:
            report["servers"][kind] = bench_server(args, kind)
    except (RuntimeError, TurnError) as exc:
        _warn(str(exc))
        return 2
    problems = []
    for kind, result in report["servers"].items():
        if "bindings" in result:
            problems += phase_warnings(f"{kind} bindings", result["bindings"])
        for level in result["relay"]:
            problems += phase_warnings(f"{kind} relay {level['streams']}", level)
    report["warnings"] = problems
    if args.json:
        _out(json.dumps(report, indent=2))
    else:
        print_report(report)
    for problem in problems:
        _warn(problem)
    failed = any(r.get("bindings", {}).get("bad") for r in report["servers"].values()) or any(
        level["duplicates"] or level["garbage"]
        for r in report["servers"].values()
        for level in r["relay"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
