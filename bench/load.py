"""Load generator for natterd, or any XMPP server: concurrent logins and one-to-one chat.

``python -m bench.load connect -c 1000`` or ``python -m bench.load chat -c 200 -m 200``;
``--help`` lists the options and bench/README.md explains the figures.

The client is a deliberately minimal raw-socket XMPP client (direct TLS or STARTTLS,
SCRAM-SHA-256, bind, initial presence) that cuts incoming data into top-level elements by
scanning tags and never builds a tree: a full client library would spend about as much CPU
per stanza as the server under test, and the figures would then measure the generator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

if not __package__:  # run as ``python bench/load.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peer import PeerProcess  # noqa: E402

CPU_WARNING = 0.85  # of one core: above this a worker may be what limits the figures
OTHERS_WARNING = 0.10  # of one core used by unrelated processes during a measurement
UNLIMITED = 1 << 62

NS_SASL = b"urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = b"urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = b"urn:ietf:params:xml:ns:xmpp-session"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _warn(text: str) -> None:
    sys.stderr.write(f"bench: warning: {text}\n")


# ---------------------------------------------------------------------------------------------
# Framing: complete top-level elements out of a byte stream, without an XML parser

# Up to the '>' that ends a tag: quoted attribute values may legally contain '>', so quotes
# are matched as units (unrolled, which is twice as fast as an alternation per character).
_TAG_REST = rb"""[^>'"]*(?:(?:'[^']*'|"[^"]*")[^>'"]*)*>"""
# A start, end or empty tag; an incomplete tag at the end of the buffer does not match at all.
_TAG = re.compile(rb"<(/?)([^\s/>'\"]*)" + _TAG_REST)
MAX_BUFFER = 16 << 20


class Framer:
    """Cuts a stream into complete top-level elements by counting tags.

    The stream header and ``</stream:stream>`` come out as elements of their own and the XML
    declaration is skipped. Comments and CDATA sections, which servers do not send, are not
    understood. Costs one regex match per tag instead of a parser callback per event.
    """

    __slots__ = ("_buf", "_pos", "_depth", "_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes
        self._depth = 0
        self._start = 0  # start of the open top-level element

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        depth, start, end = self._depth, self._start, self._pos
        for m in _TAG.finditer(buf, self._pos):
            end = m.end()
            if m.group(1):  # end tag
                if depth == 0:
                    out.append(m.group(0))  # </stream:stream>
                    continue
                depth -= 1
                if depth == 0:
                    out.append(bytes(buf[start:end]))
            elif buf[end - 2] == 0x2F:  # empty-element tag "/>"
                if depth == 0:
                    out.append(m.group(0))
            elif depth:
                depth += 1
            else:
                name = m.group(2)
                if name[:1] in (b"?", b"!"):
                    continue  # XML declaration
                if name == b"stream" or name.endswith(b":stream"):
                    out.append(m.group(0))  # stream header: never closed as an element
                    continue
                start = m.start()
                depth = 1
        if depth == 0:
            del buf[:end]
            self._pos = 0
        else:
            del buf[:start]
            self._pos = end - start
            if len(buf) > MAX_BUFFER:
                raise LoginError("an element larger than 16 MiB: framing lost")
        self._start = 0
        self._depth = depth
        return out


_START_TAG_END = re.compile(_TAG_REST)


def start_tag(el: bytes) -> bytes:
    m = _START_TAG_END.match(el)
    return el[: m.end()] if m else el


def attr(el: bytes, name: bytes) -> bytes | None:
    """An attribute of the element's own start tag (children are not searched)."""
    m = re.search(rb"\s" + re.escape(name) + rb"""\s*=\s*(?:'([^']*)'|"([^"]*)")""", start_tag(el))
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


_FIRST_CHILD = re.compile(rb"<" + _TAG_REST + rb"\s*<([\w:.-]+)")
_TEXT = re.compile(rb">([^<]*)<")


def first_child(el: bytes) -> str:
    """The first child's name: the condition of a SASL failure or a stream error."""
    m = _FIRST_CHILD.match(el)
    return m.group(1).decode(errors="replace") if m else "?"


def b64_payload(el: bytes) -> bytes:
    """Decoded text of ``<challenge>``/``<success>``; empty for ``<x/>`` and ``=``."""
    m = _TEXT.search(el)
    text = m.group(1).strip() if m else b""
    return b"" if text in (b"", b"=") else base64.b64decode(text)


# ---------------------------------------------------------------------------------------------
# SCRAM-SHA-256, client side (RFC 5802, RFC 7677)


class LoginError(Exception):
    """A login step failed; the message is the reason counted in the report."""


@lru_cache(maxsize=4096)
def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Cached like real clients do: the bench provisions every user with one salt, so the
    generator pays PBKDF2 once instead of at every login (the server never pays it)."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def _scram_attrs(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise LoginError("SCRAM: malformed server message")
        attrs.setdefault(key, value)
    return attrs


class Scram:
    """One SCRAM-SHA-256 exchange without channel binding (GS2 flag ``n``); ASCII passwords
    are used as is (SASLprep leaves them unchanged)."""

    def __init__(self, username: str, password: str) -> None:
        self._password = password
        self._nonce = secrets.token_urlsafe(18)
        name = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={name},r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return b"n,," + self._first_bare.encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = _scram_attrs(text)
        nonce = attrs.get("r", "")
        if "m" in attrs or "s" not in attrs or "i" not in attrs:
            raise LoginError("SCRAM: malformed server-first message")
        if not nonce.startswith(self._nonce) or nonce == self._nonce:
            raise LoginError("SCRAM: server nonce does not extend ours")
        salted = salted_password(self._password, base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = (int.from_bytes(client_key) ^ int.from_bytes(signature)).to_bytes(32)
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Mutual authentication: a server that does not know the key cannot produce ``v``."""
        attrs = _scram_attrs(server_final.decode())
        if "e" in attrs:
            raise LoginError(f"SCRAM: server error {attrs['e']}")
        if not self._server_signature or not hmac.compare_digest(
            base64.b64decode(attrs.get("v", "")), self._server_signature
        ):
            raise LoginError("SCRAM: wrong server signature")


# ---------------------------------------------------------------------------------------------
# The client: connection, login


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    domain: str
    tls: str  # "direct" (XEP-0368) or "starttls"
    cafile: str | None
    insecure: bool
    user_prefix: str
    password: str
    login_timeout: float


def client_context(target: Target) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=target.cafile)
    if target.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Client(asyncio.Protocol):
    """One XMPP connection. During login, elements queue for :meth:`next_element`; after
    :meth:`dispatch` they go straight from ``data_received`` to a callback, with no task
    switch per stanza."""

    def __init__(self, number: int) -> None:
        self.number = number  # the user is <prefix><number>
        self.transport: asyncio.Transport | None = None
        self.framer = Framer()
        self.closed = False
        self.jid = b""
        self.stage = "connect"  # where a login is, for its failure reason
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_element: Callable[[bytes], None] | None = None
        self._on_batch: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            elements = self.framer.feed(data)
        except LoginError:
            self.abort()
            return
        handler = self._on_element
        if handler is None:
            self._queue.extend(elements)
            self._wake()
            return
        for el in elements:
            handler(el)
        if self._on_batch is not None:
            self._on_batch()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_element(self) -> bytes:
        while not self._queue:
            if self.closed:
                raise LoginError(f"connection closed by the server ({self.stage})")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        el = self._queue.popleft()
        if el.startswith(b"<stream:error"):
            raise LoginError(f"stream error {first_child(el)}")
        if el.startswith(b"</stream:stream"):
            raise LoginError(f"stream closed by the server ({self.stage})")
        return el

    def dispatch(self, on_element: Callable[[bytes], None], on_batch: Callable[[], None]) -> None:
        """From now on hand each element to ``on_element``, then call ``on_batch`` once per read."""
        self._on_element, self._on_batch = on_element, on_batch
        while self._queue:
            on_element(self._queue.popleft())

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"</stream:stream>")
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


def _header(domain: str) -> bytes:
    return (
        f"<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
        "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    ).encode()


async def _open_stream(client: Client, domain: str) -> bytes:
    """Send a stream header; return the server's ``<stream:features>``."""
    client.send(_header(domain))
    while True:
        el = await client.next_element()
        if el.startswith(b"<stream:features"):
            return el


async def _iq(client: Client, iq_id: bytes, payload: bytes) -> bytes:
    client.send(b"<iq type='set' id='" + iq_id + b"'>" + payload + b"</iq>")
    while True:
        el = await client.next_element()
        if el.startswith(b"<iq") and attr(el, b"id") == iq_id:
            if attr(el, b"type") != b"result":
                raise LoginError(f"iq {iq_id.decode()} failed: {first_child(el)}")
            return el


async def login(client: Client, target: Target, context: ssl.SSLContext) -> None:
    """Connect, authenticate, bind and send initial presence; done when our own presence
    comes back (RFC 6121 §4.2.2), i.e. once the server has processed it."""
    loop = asyncio.get_running_loop()
    domain = target.domain
    client.stage = "stream open"
    if target.tls == "direct":
        await loop.create_connection(
            lambda: client, target.host, target.port, ssl=context, server_hostname=domain
        )
        features = await _open_stream(client, domain)
    elif target.tls == "none":  # plaintext, for measuring what TLS costs a server
        await loop.create_connection(lambda: client, target.host, target.port)
        features = await _open_stream(client, domain)
    else:
        await loop.create_connection(lambda: client, target.host, target.port)
        features = await _open_stream(client, domain)
        if b"<starttls" not in features:
            raise LoginError("STARTTLS not offered")
        client.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        if not (await client.next_element()).startswith(b"<proceed"):
            raise LoginError("STARTTLS refused")
        assert client.transport is not None
        transport = await loop.start_tls(client.transport, client, context, server_hostname=domain)
        assert transport is not None
        client.transport = transport
        client.framer = Framer()
        features = await _open_stream(client, domain)

    if b">SCRAM-SHA-256<" not in features:
        raise LoginError("SCRAM-SHA-256 not offered")
    client.stage = "sasl"
    scram = Scram(f"{target.user_prefix}{client.number}", target.password)
    client.send(
        b"<auth xmlns='"
        + NS_SASL
        + b"' mechanism='SCRAM-SHA-256'>"
        + base64.b64encode(scram.client_first())
        + b"</auth>"
    )
    el = await client.next_element()
    if not el.startswith(b"<challenge"):
        raise LoginError(f"SASL {first_child(el)}")
    client.send(
        b"<response xmlns='"
        + NS_SASL
        + b"'>"
        + base64.b64encode(scram.client_final(b64_payload(el)))
        + b"</response>"
    )
    el = await client.next_element()
    if el.startswith(b"<challenge"):  # server-final as a challenge (RFC 6120 §6.3.10)
        scram.verify(b64_payload(el))
        client.send(b"<response xmlns='" + NS_SASL + b"'/>")
        el = await client.next_element()
        if not el.startswith(b"<success"):
            raise LoginError(f"SASL {first_child(el)}")
    elif el.startswith(b"<success"):
        scram.verify(b64_payload(el))
    else:
        raise LoginError(f"SASL {first_child(el)}")

    client.stage = "stream restart"
    features = await _open_stream(client, domain)
    client.stage = "bind"
    if NS_BIND not in features:
        raise LoginError("resource binding not offered")
    bound = await _iq(
        client, b"bind", b"<bind xmlns='" + NS_BIND + b"'><resource>load</resource></bind>"
    )
    m = re.search(rb"<jid>([^<]+)</jid>", bound)
    client.jid = m.group(1) if m else b""
    session_at = features.find(NS_SESSION)
    if session_at >= 0 and b"<optional" not in features[session_at:]:
        await _iq(client, b"sess", b"<session xmlns='" + NS_SESSION + b"'/>")
    client.stage = "initial presence"
    client.send(b"<presence/>")
    while True:
        el = await client.next_element()
        if el.startswith(b"<presence"):
            if attr(el, b"type") == b"error":
                raise LoginError(f"presence error {first_child(el)}")
            client.stage = "logged in"
            return


async def timed_login(
    client: Client, target: Target, context: ssl.SSLContext, limit: asyncio.Semaphore | None
) -> tuple[int, int, str | None]:
    """(start ns, end ns, failure reason or None)."""
    async with limit if limit is not None else contextlib.nullcontext():
        start = time.perf_counter_ns()
        reason: str | None = None
        try:
            async with asyncio.timeout(target.login_timeout):
                await login(client, target, context)
        except LoginError as exc:
            reason = str(exc)
        except TimeoutError:
            reason = "timeout"
        except ssl.SSLError as exc:
            reason = f"TLS: {exc.reason or exc}"
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        except ValueError as exc:  # bad base64 or number from the server
            reason = f"malformed server data: {exc}"
        end = time.perf_counter_ns()
    if reason is not None:
        client.abort()
    return start, end, reason


# ---------------------------------------------------------------------------------------------
# Chat traffic

_BODY = re.compile(rb"<body(?:\s[^>]*)?>(\d+) (\d+) (\d+) (\d+)</body>")
# Servers escape '>' in attribute values, so the start tag ends at the first '>'.
_IS_ERROR = re.compile(rb"""<message[^>]*?\stype=['"]error['"]""")


class ChatRun:
    """One worker's chat counters; every message is checked against per-sender bitmaps."""

    def __init__(self) -> None:
        self.expected = 0
        self.delivered = 0
        self.sent = 0
        self.sent_measured = 0
        self.duplicates = 0
        self.misrouted = 0  # arrived at a client that is not its addressee
        self.bounced = 0  # type='error' messages
        self.reordered = 0
        self.unexpected = 0  # messages without our body format
        self.stream_errors = 0
        self.warm = 0  # leading messages per sender that are warm-up, not measured
        self.first_latencies = array("q")  # warm-up messages, microseconds
        self.latencies = array("q")  # measured messages, microseconds
        self.received_ns = array("q")  # arrival times of measured messages
        self.first_send_ns = 0  # of the measured phase
        self.last_send_ns = 0
        self.checkpoint = 0  # ``done`` is set when this many messages have arrived
        self.done = asyncio.Event()

    async def wait(self, stall_timeout: float) -> None:
        """Until the checkpoint, or until nothing arrived for ``stall_timeout`` seconds."""
        progress, since = -1, time.monotonic()
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.25)
            if self.delivered != progress:
                progress, since = self.delivered, time.monotonic()
            elif time.monotonic() - since > stall_timeout:
                return  # no progress: whatever is missing is lost


class Peer:
    """One client of a chat pair: sends its messages to the partner, checks what comes back.

    The ack is in-process: both ends of a pair live in the same worker, so when a message
    arrives the partner's in-flight count drops at once and it may send more; nothing extra
    crosses the network.
    """

    def __init__(
        self, client: Client, total: int, window: int, rate_mode: bool, run: ChatRun
    ) -> None:
        self.client = client
        self.total = total
        self.window = window
        self.run = run
        self.partner: Peer = self
        self.sent = 0
        self.inflight = 0
        self.due = 0 if rate_mode else UNLIMITED  # messages the pacer has released
        self.cap = total  # messages that may be sent so far (1 during the warm-up)
        self.scheduled = 0
        self.seen = bytearray(total)  # from the partner, by sequence number
        self.last_seq = -1
        self.template = b""

    def pair_with(self, partner: Peer, to: bytes) -> None:
        self.partner = partner
        me, them = self.client.number, partner.client.number
        # id and body carry the sequence number; the body also the send time and both ends.
        self.template = (
            b"<message to='"
            + to
            + b"' type='chat' id='%d'><body>%d %d "
            + f"{me} {them}".encode()
            + b"</body></message>"
        )

    def pump(self) -> None:
        """Send what the window, the pacer and the message count allow, in one write."""
        n = min(self.window - self.inflight, self.cap - self.sent, self.due)
        if n <= 0 or self.client.closed:
            return
        now = time.perf_counter_ns()
        first = self.sent
        template = self.template
        self.client.send(b"".join([template % (seq, seq, now) for seq in range(first, first + n)]))
        self.sent += n
        self.inflight += n
        self.due -= n
        run = self.run
        run.sent += n
        if first + n > run.warm:
            run.sent_measured += first + n - max(first, run.warm)
            if not run.first_send_ns:
                run.first_send_ns = now
        run.last_send_ns = now

    def on_element(self, el: bytes) -> None:
        run = self.run
        if not el.startswith(b"<message"):
            if el.startswith((b"<stream:error", b"</stream")):
                run.stream_errors += 1
            return
        if _IS_ERROR.match(el):
            run.bounced += 1
            return
        m = _BODY.search(el)
        if m is None:
            run.unexpected += 1
            return
        now = time.perf_counter_ns()
        seq, sent_at, src, dst = int(m[1]), int(m[2]), int(m[3]), int(m[4])
        partner = self.partner
        if dst != self.client.number or src != partner.client.number:
            run.misrouted += 1
            return
        seen = self.seen
        if seq >= len(seen) or seen[seq]:
            run.duplicates += 1
            return
        seen[seq] = 1
        if seq < self.last_seq:
            run.reordered += 1
        self.last_seq = seq
        partner.inflight -= 1
        if seq < run.warm:
            run.first_latencies.append((now - sent_at) // 1000)
        else:
            run.latencies.append((now - sent_at) // 1000)
            run.received_ns.append(now)
        run.delivered += 1
        if run.delivered == run.checkpoint:
            run.done.set()


async def pace(peers: list[Peer], rate: float) -> None:
    """Open loop: release messages at ``rate`` per second, round robin over the senders."""
    active = [p for p in peers if p.scheduled < p.total]
    start = time.perf_counter()
    released = 0
    i = 0
    while active:
        await asyncio.sleep(0.005)
        owed = int((time.perf_counter() - start) * rate) - released
        touched: dict[int, Peer] = {}
        while owed > 0 and active:
            i %= len(active)
            peer = active[i]
            peer.due += 1
            peer.scheduled += 1
            owed -= 1
            released += 1
            touched[id(peer)] = peer
            if peer.scheduled >= peer.total:
                active.pop(i)
            else:
                i += 1
        for peer in touched.values():
            peer.pump()


# ---------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class ChatSpec:
    messages: int
    window: int  # 0: unlimited
    rate: float  # this worker's share, msgs/s; 0: closed loop
    stall_timeout: float
    to_full: bool
    warmup: bool  # each sender's first message goes alone, before the measured phase
    grace: float = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    numbers: list[int]  # user numbers; for chat, pairs are adjacent
    target: Target
    max_pending: int  # 0: every login at once
    chat: ChatSpec | None


def raise_nofile_limit(wanted: int = 1 << 18) -> int:
    """Raise the descriptor limit (inherited by servers and workers started later): to
    ``wanted`` where allowed (root may raise the hard limit), else to the hard limit. 20,000
    sessions need more than the 20,000 some machines allow by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # not privileged: the hard limit it is
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process; talks to the parent over ``conn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    raise_nofile_limit()
    try:
        asyncio.run(_worker(spec, conn))
    except Exception as exc:
        conn.send(("error", f"worker {spec.worker}: {type(exc).__name__}: {exc}"))


async def _worker(spec: WorkerSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()

    async def command() -> str:
        return str(await loop.run_in_executor(None, conn.recv))

    context = client_context(spec.target)
    clients = [Client(n) for n in spec.numbers]
    conn.send(("ready", None))
    await command()  # "login"
    limit = asyncio.Semaphore(spec.max_pending) if spec.max_pending else None
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    results = await asyncio.gather(*(timed_login(c, spec.target, context, limit) for c in clients))
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    ok = [reason is None for _, _, reason in results]
    latencies = array("q", [(end - start) // 1000 for start, end, r in results if r is None])
    conn.send(
        (
            "logged_in",
            {
                "ok": sum(ok),
                "failures": dict(Counter(r for _, _, r in results if r is not None)),
                "latencies_us": latencies.tobytes(),
                "start_ns": min(s for s, _, _ in results),
                "end_ns": max(e for _, e, _ in results),
                "cpu_s": cpu1 - cpu0,
                "wall_s": wall1 - wall0,
            },
        )
    )
    if await command() == "chat" and spec.chat is not None:
        stats = await _chat(spec.chat, spec.target, clients, ok, conn, command)
        conn.send(("chat_done", stats))
        await command()  # "close"
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)  # let the closing writes leave
    conn.send(("closed", None))


async def _chat(
    spec: ChatSpec,
    target: Target,
    clients: list[Client],
    ok: list[bool],
    conn: Connection,
    command: Callable[[], Awaitable[str]],
) -> dict[str, Any]:
    run = ChatRun()
    window = spec.window or UNLIMITED
    peers: list[Peer] = []
    skipped = 0
    for i in range(0, len(clients) - 1, 2):
        a, b = clients[i], clients[i + 1]
        if not (ok[i] and ok[i + 1]):
            skipped += 1  # a pair with a failed login sends nothing; its logins are failures
            continue
        pa = Peer(a, spec.messages, window, spec.rate > 0, run)
        pb = Peer(b, spec.messages, window, spec.rate > 0, run)
        pa.pair_with(pb, _address(b, target, spec.to_full))
        pb.pair_with(pa, _address(a, target, spec.to_full))
        for peer in (pa, pb):
            peer.client.dispatch(peer.on_element, peer.partner.pump)
            peers.append(peer)
    run.expected = spec.messages * len(peers)
    warmup_s = 0.0
    if spec.warmup and spec.messages and peers:
        # Each sender's first message alone: it meets the cold caches (and in open loop,
        # nothing is queued behind it), and the measured phase starts warm.
        run.warm, run.checkpoint = 1, len(peers)
        for peer in peers:
            peer.cap = 1
            if spec.rate > 0:
                peer.due = peer.scheduled = 1
        started = time.perf_counter()
        for peer in peers:
            peer.pump()
        await run.wait(spec.stall_timeout)
        warmup_s = time.perf_counter() - started
    conn.send(("warmed", None))
    await command()  # "go": every worker is warm
    run.done.clear()
    run.checkpoint = run.expected
    if run.delivered >= run.checkpoint:
        run.done.set()
    for peer in peers:
        peer.cap = peer.total
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    pacer: asyncio.Task[None] | None = None
    if spec.rate > 0:
        pacer = asyncio.create_task(pace(peers, spec.rate))
    else:
        for peer in peers:
            peer.pump()
    await run.wait(spec.stall_timeout)
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    if pacer is not None:
        pacer.cancel()
    conn.send(("delivered", None))  # the parent reads the server's CPU time now
    await asyncio.sleep(spec.grace)  # late duplicates and bounces still count
    return {
        "pairs": len(peers) // 2,
        "skipped_pairs": skipped,
        "expected": run.expected,
        "sent": run.sent,
        "sent_measured": run.sent_measured,
        "delivered": run.delivered,
        "duplicates": run.duplicates,
        "misrouted": run.misrouted,
        "bounced": run.bounced,
        "reordered": run.reordered,
        "unexpected": run.unexpected,
        "stream_errors": run.stream_errors,
        "disconnects": sum(p.client.closed for p in peers),
        "latencies_us": run.latencies.tobytes(),
        "first_latencies_us": run.first_latencies.tobytes(),
        "warmup_s": warmup_s,
        "received_ns": run.received_ns.tobytes(),
        "first_send_ns": run.first_send_ns,
        "last_send_ns": run.last_send_ns,
        "cpu_s": cpu1 - cpu0,
        "wall_s": wall1 - wall0,
    }


def _address(client: Client, target: Target, full: bool) -> bytes:
    """The bare JID (what a client uses to start a chat), or the bound full JID."""
    if not client.jid:
        return f"{target.user_prefix}{client.number}@{target.domain}".encode()
    return client.jid if full else client.jid.partition(b"/")[0]


# ---------------------------------------------------------------------------------------------
# A natterd of our own


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out; natterd binds them a moment later."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def provision(url: str, domain: str, prefix: str, password: str, count: int) -> None:
    """Migrate and create users <prefix>1..<prefix>N, all with ONE credentials list: a
    shared salt is fine for a benchmark and saves 10 ms of PBKDF2 per user."""
    from xmpp_server.sasl import make_credentials
    from xmpp_server.storage import AccountExists, Storage
    from xmpp_server.storage.migrations import upgrade

    await upgrade(url)
    credentials = make_credentials(password, 4096)
    # SQLite has one writer anyway; PostgreSQL takes a few transactions at once.
    limit = asyncio.Semaphore(1 if url.startswith("sqlite") else 16)
    async with await Storage.open(url) as storage:

        async def create(user: str) -> None:
            async with limit:
                try:
                    await storage.accounts.create(user, credentials)
                except AccountExists:  # a reused database: make the password ours
                    await storage.accounts.set_credentials(user, credentials)

        await asyncio.gather(*(create(f"{prefix}{i}@{domain}") for i in range(1, count + 1)))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {toml_value(v)}\n" for key, v in values.items())
        for name, values in tables.items()
    )


def parse_setting(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (``modules.mam.mode=ephemeral``); the value is read as TOML,
    else taken as a string."""
    dotted, sep, raw = text.partition("=")
    table, dot, key = dotted.strip().rpartition(".")
    if not sep or not dot or not table or not key:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return table, key, value


class LocalServer(PeerProcess):
    """natterd as a subprocess in a temporary directory: SQLite there (or ``--db-url``), free
    loopback ports, no per-connection read rate and no login throttle, so the figures show
    the server's cost rather than its protections."""

    name = "natterd"

    def __init__(
        self,
        domain: str,
        db_url: str | None,
        keep: bool,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="natter-bench-")), keep)
        self.domain = domain
        self.settings = settings or {}  # extra config tables, e.g. {"modules.mam": {...}}
        self.data_dir = self.dir / "data"
        self.url = db_url or f"sqlite+aiosqlite:///{self.data_dir}/natterd.sqlite3"
        self.log_path = self.dir / "natterd.log"
        self.config_path = self.dir / "natterd.toml"
        self.port, self.tls_port = 0, 0

    @property
    def cafile(self) -> str:
        return str(self.data_dir / "tls" / f"{self.domain}.crt")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, users: int, prefix: str, password: str) -> None:
        self.data_dir.mkdir()
        asyncio.run(provision(self.url, self.domain, prefix, password, users))
        self.port, self.tls_port = free_ports(2)
        tables: dict[str, dict[str, Any]] = {
            "server": {"domain": self.domain, "data_dir": str(self.data_dir)},
            "storage": {"url": self.url},
            "c2s": {
                "host": "127.0.0.1",
                "port": self.port,
                "direct_tls_port": self.tls_port,
                "read_rate": 0,  # no per-connection rate limit
                "max_connections_per_ip": 0,  # every bench client comes from 127.0.0.1
            },
            "auth": {"max_failures": 0},  # no login throttle
            "logging": {"level": "info"},  # "natterd serving" is the readiness signal
        }
        for name, values in self.settings.items():
            tables.setdefault(name, {}).update(values)
        self.config_path.write_text(to_toml(tables))
        self.launch()

    def launch(self) -> None:
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xmpp_server", "--config", str(self.config_path), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while b"natterd serving" not in self.log_path.read_bytes()[start:]:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"natterd exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"natterd did not start within 60 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_files(self) -> list[Path]:
        return [self.log_path]


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def process_cpu(pid: int | None) -> float | None:
    """User+system seconds of a process (all its threads), from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# The parent: start workers, hold the barriers, merge


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous, nearly equal parts; empty ones dropped (fewer items than workers)."""
    size, extra = divmod(len(items), parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (i < extra)
        out.append(list(items[at : at + n]))
        at += n
    return [part for part in out if part]


def collect(conns: list[Connection], tag: str, timeout: float) -> list[Any]:
    """Wait for message ``tag`` from every worker; a worker error or death ends the run."""
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(conns):
        pending = [c for i, c in enumerate(conns) if i not in results]
        left = deadline - time.monotonic()
        if left <= 0 or not wait(pending, left):
            raise RuntimeError(f"workers did not report {tag!r} within {timeout:.0f} s")
        for i, c in enumerate(conns):
            if i in results or not c.poll():
                continue
            try:
                kind, payload = c.recv()
            except EOFError:
                raise RuntimeError(f"worker {i} died") from None
            if kind == "error":
                raise RuntimeError(payload)
            if kind != tag:
                raise RuntimeError(f"worker {i} sent {kind!r}, expected {tag!r}")
            results[i] = payload
    return [results[i] for i in range(len(conns))]


def percentiles(samples_us: array[int]) -> dict[str, float | None]:
    """Nearest-rank p50/p99 and the maximum, in milliseconds."""
    if not samples_us:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(samples_us)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 1)) - 1))
        return round(ordered[index] / 1000, 2)

    return {"p50": rank(0.50), "p99": rank(0.99), "max": round(ordered[-1] / 1000, 2)}


def merge_samples(parts: list[dict[str, Any]], key: str) -> array[int]:
    merged = array("q")
    for part in parts:
        merged.frombytes(part[key])
    return merged


@dataclass(frozen=True)
class Snapshot:
    """Counters read at a phase boundary; differences between two give the phase's figures."""

    wall: float
    parent_cpu: float
    server_cpu: float | None
    machine_cpu: float | None
    overflows: int | None

    @classmethod
    def take(cls, server_pid: int | None) -> Snapshot:
        return cls(
            time.perf_counter(),
            cpu_seconds(),
            process_cpu(server_pid),
            machine_cpu(),
            listen_overflows(),
        )


def machine_cpu() -> float | None:
    """Busy CPU seconds of the whole machine, all cores (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            counters = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(counters["ListenOverflows"]) if "ListenOverflows" in counters else None
    return None


def phase(a: Snapshot, b: Snapshot, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU shares of one core: the server, each worker, and everything else on the machine."""
    wall = b.wall - a.wall

    def share(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None or wall <= 0 else round((y - x) / wall, 3)

    server = share(a.server_cpu, b.server_cpu)
    machine = share(a.machine_cpu, b.machine_cpu)
    own = sum(w["cpu_s"] for w in workers) + (b.parent_cpu - a.parent_cpu)
    others = None
    if server is not None and machine is not None and wall > 0:
        others = round(max(0.0, machine - server - own / wall), 3)
    return {
        "seconds": round(wall, 3),
        "server_cpu": server,
        "worker_cpu": [round(w["cpu_s"] / w["wall_s"], 3) if w["wall_s"] else 0.0 for w in workers],
        "other_cpu": others,
        "machine_cpu": machine,
        "cores": os.cpu_count(),
        "listen_overflows": (
            b.overflows - a.overflows
            if a.overflows is not None and b.overflows is not None
            else None
        ),
    }


def orchestrate(args: argparse.Namespace, target: Target, server_pid: int | None) -> dict[str, Any]:
    """Run the scenario in worker processes held at barriers, so that every phase starts at
    once everywhere and the server's counters can be read between phases; merge the results."""
    chat = args.scenario == "chat"
    numbers = list(range(1, args.clients + 1))
    if chat:  # pairs stay together: the in-process ack needs both ends in one worker
        pairs = split(numbers[::2], args.procs)
        groups = [[n for first in part for n in (first, first + 1)] for part in pairs]
    else:
        groups = split(numbers, args.procs)
    ctx = multiprocessing.get_context("spawn")
    conns: list[Connection] = []
    procs: list[Any] = []
    for w, group in enumerate(groups):
        chat_spec = None
        if chat:
            chat_spec = ChatSpec(
                messages=args.messages,
                window=args.window,
                rate=args.rate * len(group) / args.clients if args.rate else 0.0,
                stall_timeout=args.timeout,
                to_full=args.to_full,
                warmup=not args.no_warmup,
            )
        max_pending = -(-args.max_pending * len(group) // args.clients) if args.max_pending else 0
        spec = WorkerSpec(w, group, target, max_pending, chat_spec)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)
    phases: dict[str, Any] = {}
    chats: list[dict[str, Any]] = []
    try:
        collect(conns, "ready", 120)
        rss_before = rss_kib(server_pid)
        s0 = Snapshot.take(server_pid)
        for c in conns:
            c.send("login")
        logins = collect(conns, "logged_in", args.login_timeout + 60)
        phases["login"] = phase(s0, Snapshot.take(server_pid), logins)
        time.sleep(args.settle)
        rss_sessions = rss_kib(server_pid)
        if chat:
            for c in conns:
                c.send("chat")
            collect(conns, "warmed", args.login_timeout + args.timeout + 120)
            s2 = Snapshot.take(server_pid)
            for c in conns:
                c.send("go")
            budget = args.clients * args.messages / args.rate if args.rate else 600.0
            collect(conns, "delivered", budget + args.timeout * 2 + 120)
            s3 = Snapshot.take(server_pid)
            chats = collect(conns, "chat_done", 60)
            phases["chat"] = phase(s2, s3, chats)
        for c in conns:
            c.send("close")
        collect(conns, "closed", 60)
    except BaseException:
        for proc in procs:  # interrupted or failed: no point waiting for the workers
            proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()

    ok = sum(r["ok"] for r in logins)
    failures: Counter[str] = Counter()
    for r in logins:
        failures.update(r["failures"])
    login_span = (max(r["end_ns"] for r in logins) - min(r["start_ns"] for r in logins)) / 1e9
    result: dict[str, Any] = {
        "scenario": args.scenario,
        "clients": args.clients,
        "procs": len(groups),
        "target": {
            "host": target.host,
            "port": target.port,
            "domain": target.domain,
            "tls": target.tls,
            "self_started": args.host is None,
            "settings": [f"{t}.{k}={toml_value(v)}" for t, k, v in args.server_set],
        },
        "login": {
            "ok": ok,
            "failed": args.clients - ok,
            "failures": dict(failures.most_common()),
            "seconds": round(login_span, 3),
            "rate_per_s": round(ok / login_span, 1) if login_span > 0 else None,
            "latency_ms": percentiles(merge_samples(logins, "latencies_us")),
        },
        "server": {
            "pid": server_pid,
            "rss_kib_before": rss_before,
            "rss_kib_sessions": rss_sessions,
            "kib_per_session": (
                round((rss_sessions - rss_before) / ok, 1)
                if rss_before is not None and rss_sessions is not None and ok
                else None
            ),
        },
        "phases": phases,
    }
    if chat:
        result["chat"] = merge_chat(args, chats)
    result["warnings"] = warnings(result)
    return result


def warnings(result: dict[str, Any]) -> list[str]:
    """Reasons to distrust the figures of the measured phase."""
    name = "chat" if "chat" in result else "login"
    figures = result["phases"][name]
    if figures["seconds"] < 1.0:
        return []  # too short for CPU shares to mean anything
    out = [
        f"worker {i} used {share:.0%} of a core during the {name} phase: the figures may "
        "measure the generator, not the server (try more --procs)"
        for i, share in enumerate(figures["worker_cpu"])
        if share > CPU_WARNING
    ]
    others = figures["other_cpu"]
    if others is not None and others > OTHERS_WARNING:
        out.append(
            f"other processes used {others:.0%} of a core during the {name} phase: "
            "the machine is shared, the figures are unreliable"
        )
    chat = result.get("chat")
    if chat and chat["offered_rate"] and (chat["sent_per_s"] or 0) < 0.95 * chat["offered_rate"]:
        out.append(
            f"sent {chat['sent_per_s'] or 0:,.0f} msgs/s of the {chat['offered_rate']:,.0f} offered"
        )
    return out


def merge_chat(args: argparse.Namespace, chats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the workers' counters; rates and percentiles from their merged raw samples."""
    total = {
        key: sum(c[key] for c in chats)
        for key in (
            "pairs",
            "skipped_pairs",
            "expected",
            "sent",
            "sent_measured",
            "delivered",
            "duplicates",
            "misrouted",
            "bounced",
            "reordered",
            "unexpected",
            "stream_errors",
            "disconnects",
        )
    }
    firsts = [c["first_send_ns"] for c in chats if c["first_send_ns"]]
    last_sends = [c["last_send_ns"] for c in chats if c["last_send_ns"]]
    arrivals = sorted(merge_samples(chats, "received_ns"))
    measured = len(arrivals)
    span = (arrivals[-1] - min(firsts)) / 1e9 if firsts and arrivals else 0.0
    send_span = (max(last_sends) - min(firsts)) / 1e9 if firsts and last_sends else 0.0
    steady = None
    lo, hi = len(arrivals) // 10, len(arrivals) * 9 // 10
    if hi > lo and arrivals[hi] > arrivals[lo]:
        steady = round((hi - lo) / ((arrivals[hi] - arrivals[lo]) / 1e9), 1)
    lost = total["expected"] - total["delivered"]
    return {
        "messages_per_sender": args.messages,
        "window": args.window or None,
        "offered_rate": args.rate or None,
        **total,
        "lost": lost,
        "seconds": round(span, 3),
        "measured": measured,
        "delivered_per_s": round(measured / span, 1) if span > 0 else None,
        "steady_per_s": steady,
        "sent_per_s": round(total["sent_measured"] / send_span, 1) if send_span > 0 else None,
        "latency_ms": percentiles(merge_samples(chats, "latencies_us")),
        "warmup": not args.no_warmup,
        "warmup_seconds": round(max(c["warmup_s"] for c in chats), 3) if chats else None,
        "first_message_latency_ms": percentiles(merge_samples(chats, "first_latencies_us")),
        "failed": bool(
            lost
            or total["duplicates"]
            or total["misrouted"]
            or total["bounced"]
            or total["disconnects"]
            or total["stream_errors"]
        ),
    }


# ---------------------------------------------------------------------------------------------
# Report


def _ms(values: dict[str, float | None]) -> str:
    return "  ".join(f"{k} {v:,.1f} ms" if v is not None else f"{k} -" for k, v in values.items())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cpu_row(figures: dict[str, Any]) -> str:
    text = (
        f"server {_pct(figures['server_cpu'])}, workers "
        + " ".join(_pct(x) for x in figures["worker_cpu"])
        + f", others {_pct(figures['other_cpu'])} of a core"
    )
    if figures["machine_cpu"] is not None:
        text += f"; machine {figures['machine_cpu']:.1f} of {figures['cores']} cores busy"
    return text


def print_report(r: dict[str, Any]) -> None:
    t, login, server, phases = r["target"], r["login"], r["server"], r["phases"]
    where = "self-started natterd" if t["self_started"] else "external server"
    if t["settings"]:
        where += ", " + ", ".join(t["settings"])
    _out(
        f"{r['scenario']}: {r['clients']} clients, {r['procs']} worker processes, "
        f"{'plaintext' if t['tls'] == 'none' else t['tls'] + ' TLS'} to {t['host']}:{t['port']}"
        f" ({where})"
    )
    rows: list[tuple[str, str]] = [
        ("logins", f"{login['ok']} ok, {login['failed']} failed in {login['seconds']:.2f} s"),
        ("login rate", f"{login['rate_per_s'] or 0:,.1f} /s"),
        ("login latency", _ms(login["latency_ms"])),
    ]
    for reason, count in list(login["failures"].items())[:5]:
        rows.append(("  failure", f"{count} x {reason}"))
    if server["rss_kib_before"] is not None:
        rows.append(
            (
                "server RSS",
                f"{server['rss_kib_before'] / 1024:.1f} MiB before, "
                f"{(server['rss_kib_sessions'] or 0) / 1024:.1f} MiB with {login['ok']} sessions"
                f" = {server['kib_per_session']} KiB per idle session",
            )
        )
    rows.append(("CPU (logins)", _cpu_row(phases["login"])))
    if phases["login"]["listen_overflows"]:
        rows.append(
            (
                "listen overflows",
                f"{phases['login']['listen_overflows']} (kernel-wide: dropped connection "
                "attempts, retried after 1 s, 3 s, ...)",
            )
        )
    chat = r.get("chat")
    if chat:
        mode = (
            f"offered {chat['offered_rate']:,.0f} msgs/s"
            if chat["offered_rate"]
            else f"window {chat['window'] or 'unlimited'} per sender"
        )
        rows += [
            ("chat", f"{chat['pairs']} pairs x 2 x {chat['messages_per_sender']} msgs, {mode}"),
        ]
        if chat["warmup"]:
            rows.append(
                (
                    "first messages",
                    _ms(chat["first_message_latency_ms"])
                    + f" (warm-up, one per sender, {chat['warmup_seconds']:.1f} s)",
                )
            )
        rows += [
            (
                "delivered",
                f"{chat['measured']:,} measured in {chat['seconds']:.2f} s"
                f" = {chat['delivered_per_s'] or 0:,.0f} msgs/s"
                f" (10-90 %: {chat['steady_per_s'] or 0:,.0f} msgs/s;"
                f" sent at {chat['sent_per_s'] or 0:,.0f} msgs/s)",
            ),
            ("latency", _ms(chat["latency_ms"])),
            (
                "exactly once",
                f"{chat['delivered']:,} of {chat['expected']:,}: lost {chat['lost']}, "
                f"duplicates {chat['duplicates']}, misrouted {chat['misrouted']}, bounced "
                f"{chat['bounced']}, disconnects {chat['disconnects']}, "
                f"reordered {chat['reordered']}",
            ),
            ("CPU (chat)", _cpu_row(phases["chat"])),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        _out(f"  {key:<{width}}  {value}")


# ---------------------------------------------------------------------------------------------
# Command line


def common_options() -> argparse.ArgumentParser:
    """The target and run options every scenario takes (a parent parser; bench.muc too)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("target (default: start a natterd of our own)")
    g.add_argument("--host", help="an existing server's address; its users must exist")
    g.add_argument("--port", type=int, help="default: 5223 for direct TLS, 5222 for STARTTLS")
    g.add_argument("--domain", default="localhost", help="XMPP domain (default: localhost)")
    g.add_argument(
        "--tls",
        choices=("direct", "starttls", "none"),
        default="direct",
        help="none: plaintext c2s (the own natterd then runs with c2s.require_tls = false)",
    )
    g.add_argument("--user-prefix", default="u", help="users are PREFIX1..PREFIXN (default: u)")
    g.add_argument("--password", default="bench-password")
    g.add_argument("--cafile", help="CA file to verify the server (own server: its certificate)")
    g.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    g.add_argument("--server-pid", type=int, help="PID of an external server, to read its RSS")
    g.add_argument("--db-url", help="own server on this database (e.g. postgresql+asyncpg://…)")
    g.add_argument("--keep", action="store_true", help="keep the own server's directory and log")
    g.add_argument(
        "--server-set",
        action="append",
        type=parse_setting,
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting for the own server, e.g. modules.mam.mode=ephemeral (repeatable)",
    )
    g = common.add_argument_group("run")
    g.add_argument("--procs", type=int, default=2, help="worker processes (default: 2)")
    g.add_argument("--max-pending", type=int, default=0, help="logins in progress at once (0: all)")
    g.add_argument("--login-timeout", type=float, default=60.0)
    g.add_argument("--settle", type=float, default=1.0, help="seconds before reading the RSS")
    g.add_argument("--json", action="store_true", help="print one JSON document instead")
    return common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    p = scenarios.add_parser("connect", parents=[common], help="N concurrent logins, then RSS")
    p.add_argument("-c", "--clients", type=int, default=1000)
    p = scenarios.add_parser("chat", parents=[common], help="one-to-one messages in N/2 pairs")
    p.add_argument("-c", "--clients", type=int, default=200)
    p.add_argument("-m", "--messages", type=int, default=200, help="messages per sender")
    p.add_argument(
        "--window",
        type=int,
        help="unacknowledged messages per sender (default: 1 closed loop; unlimited with --rate)",
    )
    p.add_argument("--rate", type=float, default=0.0, help="fixed offered rate, msgs/s in total")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after this long idle")
    p.add_argument("--to-full", action="store_true", help="address the full JID, not the bare")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="measure from the first message (default: each sender's first message goes alone"
        " and is reported apart, so cold caches do not distort the figures)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.procs < 1:
        parser.error("--clients and --procs must be positive")
    if args.scenario == "chat":
        if args.clients % 2:
            parser.error("chat needs an even number of clients")
        if args.messages < 1:
            parser.error("--messages must be positive")
        if args.window is None:
            args.window = 0 if args.rate else 1
    if args.host is not None and (args.db_url or args.server_set):
        parser.error("--db-url and --server-set are for the server this tool starts")
    return args


def target_of(args: argparse.Namespace, server: Any) -> Target:
    """Where the generator connects: a server it started (``server``: LocalServer or
    ProsodyServer) or the one the options name."""
    if server is not None:
        host, cafile = "127.0.0.1", server.cafile
        port = server.tls_port if args.tls == "direct" else server.port
    else:
        host, cafile = args.host, args.cafile
        port = args.port or (5223 if args.tls == "direct" else 5222)
    return Target(
        host=host,
        port=port,
        domain=args.domain,
        tls=args.tls,
        cafile=args.cafile or cafile,
        insecure=args.insecure,
        user_prefix=args.user_prefix,
        password=args.password,
        login_timeout=args.login_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()  # inherited by natterd and the workers
    # SIGTERM unwinds like Ctrl-C, so the server of our own is stopped and its directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server: LocalServer | None = None
    try:
        if args.host is None:
            settings: dict[str, dict[str, Any]] = {}
            if args.tls == "none":
                settings["c2s"] = {"require_tls": False}
            for table, key, value in args.server_set:
                settings.setdefault(table, {})[key] = value
            server = LocalServer(args.domain, args.db_url, args.keep, settings)
            server.start(args.clients, args.user_prefix, args.password)
        target = target_of(args, server)
        pid = server.pid if server is not None else args.server_pid
        result = orchestrate(args, target, pid)
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        if server is not None and server.proc is not None:
            sys.stderr.write(f"natterd log (last lines):\n{server.log_tail()}\n")
        return 2
    finally:
        if server is not None:
            server.stop()
    for warning in result["warnings"]:
        _warn(warning)
    if args.json:
        _out(json.dumps(result, indent=2))
    else:
        print_report(result)
    failed = result["login"]["failed"] or result.get("chat", {}).get("failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
