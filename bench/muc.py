"""Multi-User Chat (XEP-0045) fan-out: R rooms of N occupants, a few senders, exactly once.

``python -m bench.muc [--sizes 10,100,1000] [--rooms R] [--senders S] [--rate X]``; ``--help``
lists the options and bench/README.md explains the figures. Targets a natterd of its own
(default), a private Prosody (``--server prosody``) or any XEP-0045 service (``--host``).

For each room size in turn: the first occupant of each room creates it (and unlocks it with
an instant-room form when the service answers 201), the other occupants join at once, then S
senders per room post groupchat messages (closed loop with a window, or an offered rate) and
every occupant checks that it got every message exactly once. Clients, login and worker
processes come from bench.load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import re
import signal
import ssl
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.load import (
    CPU_WARNING,
    MAX_BUFFER,
    OTHERS_WARNING,
    UNLIMITED,
    ChatRun,
    Client,
    Framer,
    LocalServer,
    LoginError,
    Peer,
    Snapshot,
    Target,
    client_context,
    collect,
    common_options,
    cpu_seconds,
    merge_samples,
    pace,
    percentiles,
    phase,
    raise_nofile_limit,
    rss_kib,
    target_of,
    timed_login,
    toml_value,
)
from bench.prosody import ProsodyServer

NS_MUC = b"http://jabber.org/protocol/muc"
NS_MUC_OWNER = b"http://jabber.org/protocol/muc#owner"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _warn(text: str) -> None:
    sys.stderr.write(f"bench: warning: {text}\n")


# ---------------------------------------------------------------------------------------------
# Framing for many small stanzas

_TAG_REST = rb"""[^>'"]*(?:(?:'[^']*'|"[^"]*")[^>'"]*)*>"""
_TAG = re.compile(rb"<(/?)([^\s/>'\"]*)" + _TAG_REST)


def _element_end(buf: bytearray, pos: int) -> int:
    """End of the element whose start tag ends at ``pos`` (depth counting), -1 if incomplete."""
    depth = 1
    for m in _TAG.finditer(buf, pos):
        if m.group(1):
            depth -= 1
            if depth == 0:
                return m.end()
        elif buf[m.end() - 2] != 0x2F:
            depth += 1
    return -1


class FastFramer(Framer):
    """bench.load's Framer with a shortcut: a top-level ``<name ...>`` usually ends at the
    first ``</name>``, which ``bytes.find`` locates at C speed; only when another ``<name``
    starts in between (a nested element of the same name) or the end tag is not there yet do
    the tags get counted one by one. One regex match per stanza instead of one per tag: a
    join of 1000 occupants sends the clients a million presences, and the generator must
    stay cheaper than the server."""

    __slots__ = ()

    @classmethod
    def take_over(cls, old: Framer) -> FastFramer:
        """Continue where ``old`` stopped: its buffer starts at an element boundary."""
        new = cls()
        new._buf = old._buf
        return new

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        find, match = buf.find, _TAG.match
        pos = 0
        while True:
            lt = find(b"<", pos)
            if lt < 0:
                pos = len(buf)  # whitespace between stanzas
                break
            m = match(buf, lt)
            if m is None:
                pos = lt  # an incomplete tag
                break
            end = m.end()
            if m.group(1) or buf[end - 2] == 0x2F:  # </stream:stream>, or an empty element
                out.append(m.group(0))
                pos = end
                continue
            name = m.group(2)
            if name[:1] in (b"?", b"!"):  # XML declaration
                pos = end
                continue
            if name == b"stream" or name.endswith(b":stream"):
                out.append(m.group(0))  # stream header: never closed as an element
                pos = end
                continue
            close = find(b"</" + name + b">", end)
            if close >= 0 and find(b"<" + name, end, close) < 0:
                stop = close + len(name) + 3
            else:
                stop = _element_end(buf, end)
                if stop < 0:
                    pos = lt
                    break
            out.append(bytes(buf[lt:stop]))
            pos = stop
        del buf[:pos]
        if len(buf) > MAX_BUFFER:
            raise LoginError("an element larger than 16 MiB: framing lost")
        return out


# ---------------------------------------------------------------------------------------------
# Occupants

# Message bodies: sequence number, send time (perf_counter_ns, CLOCK_MONOTONIC: the same
# clock in every worker process), sender's user number, room number.
_BODY = re.compile(rb"<body(?:\s[^>]*)?>(\d+) (\d+) (\d+) (\d+)</body>")
_IS_ERROR = re.compile(rb"""<(?:message|presence)[^>]*?\stype=['"]error['"]""")
_TYPE = re.compile(rb"""\stype=['"]([^'"]*)['"]""")
_STATUS = re.compile(rb"""<status\s+code=['"](\d+)['"]""")
_CONDITION = re.compile(rb"<error[^>]*>\s*<([\w-]+)")
_IQ_ID = re.compile(rb"""\sid=['"]([^'"]*)['"]""")
_FROM = re.compile(rb"""\sfrom=['"]([^'"]*)['"]""")
_PING = b"urn:xmpp:ping"

JOINING, JOINED, FAILED, LEAVING, LEFT = range(5)


def _reason(el: bytes) -> str:
    m = _CONDITION.search(el)
    return m.group(1).decode(errors="replace") if m else "error"


@dataclass(frozen=True)
class Room:
    number: int
    jid: bytes
    size: int
    first_user: int
    senders: tuple[int, ...]  # user numbers

    def index(self, user: int) -> int:
        return user - self.first_user


class Countdown:
    """Counts events towards a target; :meth:`wait` ends at the target or after
    ``stall`` seconds without progress."""

    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.last_ns = 0
        self.done = asyncio.Event()
        self.then: Callable[[], None] | None = None  # called at each event
        if target <= 0:
            self.done.set()

    def add(self) -> None:
        self.count += 1
        self.last_ns = time.perf_counter_ns()
        if self.count >= self.target:
            self.done.set()
        if self.then is not None:
            self.then()

    async def wait(self, stall: float) -> None:
        progress, since = -1, time.monotonic()
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 0.25)
            if self.count != progress:
                progress, since = self.count, time.monotonic()
            elif time.monotonic() - since > stall:
                return


class Sender(Peer):
    """Posts to a room; its window opens when the room reflects its own message back to it
    (XEP-0045 §7.4: the sender receives its message like every other occupant). Pacing,
    windowing and send counters are bench.load's Peer, with a groupchat template."""

    def __init__(
        self, client: Client, room: Room, total: int, window: int, rate: bool, run: ChatRun
    ) -> None:
        super().__init__(client, total, window, rate, run)
        self.cap = 0  # nothing before the warm-up: on_batch pumps while the room fills
        # Like Peer's: id and body carry the sequence number, the body also the send time.
        self.template = (
            b"<message to='"
            + room.jid
            + b"' type='groupchat' id='%d'><body>%d %d "
            + f"{client.number} {room.number}".encode()
            + b"</body></message>"
        )


class Occupant:
    """One client in one room: joins, counts occupant presences, checks every message."""

    __slots__ = (
        "client",
        "room",
        "run",
        "messages",
        "sender",
        "state",
        "nick_jid",
        "join_sent_ns",
        "joined_ns",
        "created",
        "failure",
        "presences",
        "seen",
        "last",
        "joins",
        "settled",
        "leaves",
        "iq_waiter",
    )

    def __init__(
        self,
        client: Client,
        room: Room,
        run: ChatRun,
        messages: int,
        joins: Countdown,
        settled: Countdown,
    ) -> None:
        self.client = client
        self.room = room
        self.run = run
        self.messages = messages
        self.sender: Sender | None = None
        self.state = JOINING
        self.nick_jid = room.jid + b"/" + _nick(client).encode()
        self.join_sent_ns = 0
        self.joined_ns = 0
        self.created = False  # the self-presence said 201
        self.failure: str | None = None
        self.presences = 0  # available occupant presences from the room, our own included
        self.seen = bytearray(len(room.senders) * messages)  # by sender index and sequence
        self.last = [-1] * len(room.senders)
        self.joins = joins
        self.settled = settled
        self.leaves: Countdown | None = None
        self.iq_waiter: asyncio.Future[bytes] | None = None

    def join(self) -> None:
        self.client.dispatch(self.on_element, self.on_batch)
        self.join_sent_ns = time.perf_counter_ns()
        self.client.send(
            b"<presence to='"
            + self.nick_jid
            + b"'><x xmlns='"
            + NS_MUC
            + b"'><history maxstanzas='0'/></x></presence>"
        )

    def leave(self, leaves: Countdown) -> None:
        self.leaves = leaves
        if self.state != JOINED or self.client.closed:
            leaves.add()
            return
        self.state = LEAVING
        self.client.send(b"<presence type='unavailable' to='" + self.nick_jid + b"'/>")

    def on_batch(self) -> None:
        if self.sender is not None:
            self.sender.pump()

    def on_element(self, el: bytes) -> None:
        if el.startswith(b"<message"):
            self.on_message(el)
        elif el.startswith(b"<presence"):
            self.on_presence(el)
        elif el.startswith(b"<iq"):
            self.on_iq(el)
        elif el.startswith((b"<stream:error", b"</stream")):
            self.run.stream_errors += 1
            self._fail("stream closed")

    def on_message(self, el: bytes) -> None:
        run = self.run
        if _IS_ERROR.match(el):
            run.bounced += 1
            return
        m = _BODY.search(el)
        if m is None:
            if b"<body" in el:
                run.unexpected += 1
            return  # the subject, status notices
        now = time.perf_counter_ns()
        seq, sent_at, src, room_no = int(m[1]), int(m[2]), int(m[3]), int(m[4])
        room = self.room
        if room_no != room.number or src not in room.senders or seq >= self.messages:
            run.misrouted += 1
            return
        index = room.senders.index(src)
        slot = index * self.messages + seq
        seen = self.seen
        if seen[slot]:
            run.duplicates += 1
            return
        seen[slot] = 1
        if seq < self.last[index]:
            run.reordered += 1
        self.last[index] = seq
        sender = self.sender
        if sender is not None and src == self.client.number:
            sender.inflight -= 1  # our own message came back: the window opens
        if seq < run.warm:
            run.first_latencies.append((now - sent_at) // 1000)
        else:
            run.latencies.append((now - sent_at) // 1000)
            run.received_ns.append(now)
        run.delivered += 1
        if run.delivered == run.checkpoint:
            run.done.set()

    def on_presence(self, el: bytes) -> None:
        head = el[: el.find(b">")]
        kind = None
        if b"type=" in head:
            t = _TYPE.search(head)
            kind = t.group(1) if t else None
        if kind == b"error":
            if self.state == JOINING:
                self._fail(f"join: {_reason(el)}")
            return
        own = b"110" in el and b"110" in _STATUS.findall(el)
        if kind == b"unavailable":
            if own and self.state == LEAVING:
                self.state = LEFT
                if self.leaves is not None:
                    self.leaves.add()
            return
        if kind is not None:
            return
        self.presences += 1
        if self.presences == self.room.size:
            self.settled.add()
        if own and self.state == JOINING:
            self.state = JOINED
            self.joined_ns = time.perf_counter_ns()
            self.created = b"201" in _STATUS.findall(el)
            self.joins.add()

    def on_iq(self, el: bytes) -> None:
        head = el[: el.find(b">")]
        kind = _TYPE.search(head)
        if kind and kind.group(1) in (b"result", b"error"):
            if self.iq_waiter is not None and not self.iq_waiter.done():
                self.iq_waiter.set_result(el)
            return
        m = _IQ_ID.search(head)
        iq_id = m.group(1) if m else b""
        frm = _FROM.search(head)
        to = b" to='" + frm.group(1) + b"'" if frm else b""
        if _PING in el:  # a server's keepalive
            self.client.send(b"<iq type='result' id='" + iq_id + b"'" + to + b"/>")
        else:
            self.client.send(
                b"<iq type='error' id='" + iq_id + b"'" + to + b"><error type='cancel'>"
                b"<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                b"</error></iq>"
            )

    def _fail(self, reason: str) -> None:
        if self.state == JOINING:
            self.failure = reason
            self.state = FAILED
            self.joins.add()  # counted as done; the failure is reported

    async def unlock(self, timeout: float) -> str | None:
        """Accept the default configuration of a room we just created (an 'instant room',
        XEP-0045 §10.1.2); None, or the reason it failed."""
        self.iq_waiter = asyncio.get_running_loop().create_future()
        self.client.send(
            b"<iq type='set' id='muc-unlock' to='"
            + self.room.jid
            + b"'><query xmlns='"
            + NS_MUC_OWNER
            + b"'><x xmlns='jabber:x:data' type='submit'/></query></iq>"
        )
        try:
            el = await asyncio.wait_for(self.iq_waiter, timeout)
        except TimeoutError:
            return "unlock: timeout"
        finally:
            self.iq_waiter = None
        kind = _TYPE.search(el[: el.find(b">")])
        return None if kind and kind.group(1) == b"result" else f"unlock: {_reason(el)}"


def _nick(client: Client) -> str:
    return f"u{client.number}"


# ---------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class MucSpec:
    worker: int
    numbers: list[int]  # user numbers of this worker's clients
    target: Target
    max_pending: int  # logins in progress at once in this worker; 0: all
    join_window: int  # joins in progress at once in this worker; 0: all
    window: int  # 0: unlimited
    stall_timeout: float
    grace: float = 0.5


@dataclass(frozen=True)
class SizePlan:
    size: int
    rooms: list[Room]
    messages: int  # per sender, warm-up message included
    rate: float  # msgs/s offered in total over all senders; 0: closed loop


def worker_main(spec: MucSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    raise_nofile_limit()
    try:
        asyncio.run(_worker(spec, conn))
    except Exception as exc:
        conn.send(("error", f"worker {spec.worker}: {type(exc).__name__}: {exc}"))


async def _login(
    client: Client, target: Target, context: ssl.SSLContext, limit: asyncio.Semaphore | None
) -> tuple[int, int, str | None]:
    result = await timed_login(client, target, context, limit)
    if result[2] is None:
        client.framer = FastFramer.take_over(client.framer)
    return result


async def _worker(spec: MucSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()

    async def command() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    context = client_context(spec.target)
    clients = {n: Client(n) for n in spec.numbers}
    conn.send(("ready", None))
    await command()  # "login"
    limit = asyncio.Semaphore(spec.max_pending) if spec.max_pending else None
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    results = await asyncio.gather(
        *(_login(c, spec.target, context, limit) for c in clients.values())
    )
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    failed = {c.number: r for c, (_, _, r) in zip(clients.values(), results, strict=True) if r}
    conn.send(
        (
            "logged_in",
            {
                "ok": len(clients) - len(failed),
                "failures": dict(Counter(failed.values())),
                "latencies_us": array(
                    "q", [(e - s) // 1000 for s, e, r in results if r is None]
                ).tobytes(),
                "start_ns": min((s for s, _, _ in results), default=0),
                "end_ns": max((e for _, e, _ in results), default=0),
                "cpu_s": cpu1 - cpu0,
                "wall_s": wall1 - wall0,
            },
        )
    )
    while True:
        cmd = await command()
        if cmd == "close":
            break
        assert isinstance(cmd, SizePlan)
        await _size(spec, cmd, clients, failed, conn, command)
    for client in clients.values():
        client.close()
    await asyncio.sleep(0.2)  # let the closing writes leave
    conn.send(("closed", None))


async def _size(
    spec: MucSpec,
    plan: SizePlan,
    clients: dict[int, Client],
    login_failed: dict[int, str],
    conn: Connection,
    command: Callable[[], Awaitable[Any]],
) -> None:
    """One room size, driven by the parent's commands: create, join, warm, go, leave."""
    run = ChatRun()
    rate_mode = plan.rate > 0
    window = spec.window or UNLIMITED
    creators: list[Occupant] = []
    joiners: list[Occupant] = []
    senders: list[Sender] = []
    ours = [
        (room, n)
        for room in plan.rooms
        for n in range(room.first_user, room.first_user + room.size)
        if n in clients
    ]
    joins = Countdown(sum(room.index(n) > 0 for room, n in ours))
    creations = Countdown(sum(room.index(n) == 0 for room, n in ours))
    settled = Countdown(len(ours))  # the target becomes the number joined once joins end
    occupants: list[Occupant] = []
    for room, n in ours:
        first = room.index(n) == 0
        occupant = Occupant(
            clients[n], room, run, plan.messages, creations if first else joins, settled
        )
        if n in login_failed:
            occupant.state, occupant.failure = FAILED, f"login: {login_failed[n]}"
            occupant.joins.add()
        occupants.append(occupant)
        (creators if first else joiners).append(occupant)
        if n in room.senders and n not in login_failed:
            occupant.sender = Sender(clients[n], room, plan.messages, window, rate_mode, run)
            senders.append(occupant.sender)
    conn.send(("planned", None))

    # The first occupant of each room creates it and unlocks it if the service locked it.
    await command()  # "create"
    t0 = time.perf_counter_ns()
    for occupant in creators:
        if occupant.state == JOINING:
            occupant.join()
    await creations.wait(spec.stall_timeout)
    unlocks = [o for o in creators if o.state == JOINED and o.created]
    reasons = await asyncio.gather(*(o.unlock(spec.stall_timeout) for o in unlocks))
    for occupant, reason in zip(unlocks, reasons, strict=True):
        if reason:
            occupant.failure = reason
    for occupant in creators:
        if occupant.state == JOINING:
            occupant.failure, occupant.state = "join: timeout", FAILED
    conn.send(
        (
            "created",
            {
                "rooms": len(creators),
                "joined": sum(o.state == JOINED for o in creators),
                "created": len(unlocks),
                "failures": dict(Counter(o.failure for o in creators if o.failure)),
                "seconds": (time.perf_counter_ns() - t0) / 1e9,
            },
        )
    )

    # Everybody else joins, at most join_window at a time (the rooms fill side by side);
    # then every occupant should see all N occupants' presence.
    await command()  # "join"
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    start_ns = time.perf_counter_ns()
    queue = deque(
        sorted(
            (o for o in joiners if o.state == JOINING),
            key=lambda o: (o.room.index(o.client.number), o.room.number),
        )
    )

    def next_join() -> None:
        if queue:
            queue.popleft().join()

    joins.then = next_join
    for _ in range(spec.join_window or len(queue)):
        next_join()
    await joins.wait(spec.stall_timeout)
    joins.then = None
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    for occupant in joiners:
        if occupant.state == JOINING:
            occupant.failure, occupant.state = "join: timeout", FAILED
    ok = [o for o in joiners if o.state == JOINED]
    conn.send(
        (
            "joined",
            {
                "joins": len(joiners),
                "ok": len(ok),
                "failures": dict(Counter(o.failure for o in joiners if o.failure)),
                "latencies_us": array(
                    "q", [(o.joined_ns - o.join_sent_ns) // 1000 for o in ok]
                ).tobytes(),
                "start_ns": start_ns if joiners else 0,
                "end_ns": max((o.joined_ns for o in ok), default=0),
                "cpu_s": cpu1 - cpu0,
                "wall_s": wall1 - wall0,
            },
        )
    )
    settled.target = sum(o.state == JOINED for o in occupants)
    if settled.count >= settled.target:
        settled.done.set()
    await settled.wait(spec.stall_timeout)
    cpu2, wall2 = cpu_seconds(), time.perf_counter()
    live = [o for o in occupants if o.state == JOINED]
    conn.send(
        (
            "settled",
            {
                "presences": sum(o.presences for o in occupants),
                "expected": sum(o.room.size for o in live),
                "incomplete": sum(o.presences < o.room.size for o in live),
                "end_ns": settled.last_ns,
                "cpu_s": cpu2 - cpu0,
                "wall_s": wall2 - wall0,
            },
        )
    )

    cmd = await command()  # "warm", or "skip" when a join failed somewhere
    if cmd == "warm":
        await _messages(spec, plan, run, live, senders, conn, command)
    cmd = await command()  # "leave" or "stay" (the last size: closing is enough)
    if cmd == "leave":
        leaves = Countdown(len(occupants))
        for occupant in occupants:
            occupant.leave(leaves)
        await leaves.wait(min(spec.stall_timeout, 10.0))
        conn.send(("left", {"left": leaves.count, "occupants": len(occupants)}))


async def _messages(
    spec: MucSpec,
    plan: SizePlan,
    run: ChatRun,
    live: list[Occupant],
    senders: list[Sender],
    conn: Connection,
    command: Callable[[], Awaitable[Any]],
) -> None:
    per_room = len(plan.rooms[0].senders)
    # Warm-up: each sender's first message alone; the measured phase starts warm everywhere.
    run.warm, run.checkpoint = 1, len(live) * per_room
    for sender in senders:
        sender.cap = 1
        if plan.rate > 0:
            sender.due = sender.scheduled = 1
    started = time.perf_counter()
    for sender in senders:
        sender.pump()
    if run.delivered >= run.checkpoint:
        run.done.set()
    await run.wait(spec.stall_timeout)
    warmup_s = time.perf_counter() - started
    conn.send(("warmed", None))

    await command()  # "go"
    run.done.clear()
    run.expected = run.checkpoint = len(live) * per_room * plan.messages
    if run.delivered >= run.checkpoint:
        run.done.set()
    for sender in senders:
        sender.cap = sender.total
    total_senders = sum(len(room.senders) for room in plan.rooms)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    pacer: asyncio.Task[None] | None = None
    if plan.rate > 0 and senders:
        pacer = asyncio.create_task(pace(list(senders), plan.rate * len(senders) / total_senders))
    else:
        for sender in senders:
            sender.pump()
    await run.wait(spec.stall_timeout)
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    if pacer is not None:
        pacer.cancel()
    conn.send(("delivered", None))  # the parent reads the server's CPU time now
    await asyncio.sleep(spec.grace)  # late duplicates and bounces still count
    conn.send(
        (
            "done",
            {
                "occupants": len(live),
                "senders": len(senders),
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
                "disconnects": sum(o.client.closed for o in live),
                "latencies_us": run.latencies.tobytes(),
                "first_latencies_us": run.first_latencies.tobytes(),
                "received_ns": run.received_ns.tobytes(),
                "first_send_ns": run.first_send_ns,
                "last_send_ns": run.last_send_ns,
                "warmup_s": warmup_s,
                "cpu_s": cpu1 - cpu0,
                "wall_s": wall1 - wall0,
            },
        )
    )


# ---------------------------------------------------------------------------------------------
# The parent: plan the sizes, hold the barriers, merge


def plans(args: argparse.Namespace, muc_domain: str) -> list[SizePlan]:
    """Room numbers run on across the sizes (the 10-room is room1, the 100-room room2, ...):
    every size starts with new rooms. Occupants of room r of a size are users
    r*N+1..(r+1)*N; the first creates the room, the first S are the senders."""
    out: list[SizePlan] = []
    number = args.first_room
    for size in args.sizes:
        rooms = []
        for r in range(args.rooms):
            first = r * size + 1
            jid = f"{args.room_prefix}{number}@{muc_domain}".encode()
            senders = tuple(range(first, first + min(args.senders, size)))
            rooms.append(Room(number, jid, size, first, senders))
            number += 1
        per_sender = args.messages or max(
            args.min_messages, -(-args.deliveries // (args.rooms * len(rooms[0].senders) * size))
        )
        out.append(SizePlan(size, rooms, per_sender, args.rate))
    return out


def _span(starts: list[int], ends: list[int]) -> float:
    starts, ends = [s for s in starts if s], [e for e in ends if e]
    return (max(ends) - min(starts)) / 1e9 if starts and ends else 0.0


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def merge_messages(plan: SizePlan, done: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "occupants",
        "senders",
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
    total = {key: sum(d[key] for d in done) for key in keys}
    arrivals = sorted(merge_samples(done, "received_ns"))
    firsts = [d["first_send_ns"] for d in done]
    span = _span(firsts, [arrivals[-1]] if arrivals else [])
    send_span = _span(firsts, [d["last_send_ns"] for d in done])
    steady = None
    lo, hi = len(arrivals) // 10, len(arrivals) * 9 // 10
    if hi > lo and arrivals[hi] > arrivals[lo]:
        steady = round((hi - lo) / ((arrivals[hi] - arrivals[lo]) / 1e9), 1)
    lost = total["expected"] - total["delivered"]
    return {
        "messages_per_sender": plan.messages,
        "offered_rate": plan.rate or None,
        **total,
        "lost": lost,
        "measured": len(arrivals),
        "seconds": round(span, 3),
        "delivered_per_s": _rate(len(arrivals), span),
        "steady_per_s": steady,
        "sent_per_s": _rate(total["sent_measured"], send_span),
        "latency_ms": percentiles(merge_samples(done, "latencies_us")),
        "warmup_seconds": round(max(d["warmup_s"] for d in done), 3),
        "first_message_latency_ms": percentiles(merge_samples(done, "first_latencies_us")),
        "failed": bool(
            lost
            or total["duplicates"]
            or total["misrouted"]
            or total["bounced"]
            or total["disconnects"]
            or total["stream_errors"]
        ),
    }


def size_warnings(size: dict[str, Any]) -> list[str]:
    out = []
    for name in ("join", "messages"):
        figures = size["phases"].get(name)
        if not figures or figures["seconds"] < 1.0:
            continue  # too short for CPU shares to mean anything
        for i, share in enumerate(figures["worker_cpu"]):
            if share > CPU_WARNING:
                out.append(
                    f"size {size['size']}: worker {i} used {share:.0%} of a core during the "
                    f"{name} phase: the figures may measure the generator, not the server "
                    "(try more --procs, or a second machine)"
                )
        others = figures["other_cpu"]
        if others is not None and others > OTHERS_WARNING:
            out.append(
                f"size {size['size']}: other processes used {others:.0%} of a core during the "
                f"{name} phase: the machine is shared, the figures are unreliable"
            )
    msgs = size.get("messages")
    if msgs and msgs["offered_rate"] and (msgs["sent_per_s"] or 0) < 0.95 * msgs["offered_rate"]:
        out.append(
            f"size {size['size']}: sent {msgs['sent_per_s'] or 0:,.0f} msgs/s of the "
            f"{msgs['offered_rate']:,.0f} offered"
        )
    join = size["join"]
    if join["presences_incomplete"]:
        out.append(
            f"size {size['size']}: {join['presences_incomplete']} occupants saw fewer than "
            f"{size['size']} occupant presences ({join['presences']:,} of "
            f"{join['presences_expected']:,} arrived)"
        )
    return out


def orchestrate(
    args: argparse.Namespace, target: Target, muc_domain: str, server_pid: int | None
) -> dict[str, Any]:
    """Log every user in once, then run the sizes one after another in the same sessions."""
    users = args.rooms * max(args.sizes)
    # Interleaved: every room's occupants, senders included, are spread over all workers.
    groups = [
        g
        for g in ([n for n in range(w + 1, users + 1, args.procs)] for w in range(args.procs))
        if g
    ]
    ctx = multiprocessing.get_context("spawn")
    conns: list[Connection] = []
    procs: list[Any] = []
    for w, group in enumerate(groups):
        pending = -(-args.max_pending * len(group) // users) if args.max_pending else 0
        join_window = -(-args.join_window * len(group) // users) if args.join_window else 0
        spec = MucSpec(w, group, target, pending, join_window, args.window, args.timeout)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)

    def broadcast(message: Any) -> None:
        for c in conns:
            c.send(message)

    long = args.login_timeout + args.timeout * 4 + 1800
    sizes: list[dict[str, Any]] = []
    try:
        collect(conns, "ready", 120)
        s0 = Snapshot.take(server_pid)
        broadcast("login")
        logins = collect(conns, "logged_in", long)
        login_phase = phase(s0, Snapshot.take(server_pid), logins)
        failures: Counter[str] = Counter()
        for r in logins:
            failures.update(r["failures"])
        login_span = _span([r["start_ns"] for r in logins], [r["end_ns"] for r in logins])
        ok = sum(r["ok"] for r in logins)
        login = {
            "users": users,
            "ok": ok,
            "failed": users - ok,
            "failures": dict(failures.most_common()),
            "seconds": round(login_span, 3),
            "rate_per_s": _rate(ok, login_span),
            "latency_ms": percentiles(merge_samples(logins, "latencies_us")),
            "phase": login_phase,
        }
        todo = plans(args, muc_domain)
        for i, plan in enumerate(todo):
            broadcast(plan)
            collect(conns, "planned", 60)
            broadcast("create")
            created = collect(conns, "created", long)
            rss_before = rss_kib(server_pid)
            a = Snapshot.take(server_pid)
            broadcast("join")
            joined = collect(conns, "joined", long)
            b = Snapshot.take(server_pid)
            settled = collect(conns, "settled", long)
            rss_after = rss_kib(server_pid)
            join_failures: Counter[str] = Counter()
            for r in created + joined:
                join_failures.update(r["failures"])
            join_ok = sum(r["ok"] for r in joined)
            join_span = _span([r["start_ns"] for r in joined], [r["end_ns"] for r in joined])
            settle_span = _span([r["start_ns"] for r in joined], [r["end_ns"] for r in settled])
            presences = sum(r["presences"] for r in settled)
            result: dict[str, Any] = {
                "size": plan.size,
                "rooms": [room.jid.decode() for room in plan.rooms],
                "senders_per_room": len(plan.rooms[0].senders),
                "create": {
                    "rooms": sum(r["rooms"] for r in created),
                    "created": sum(r["created"] for r in created),
                    "joined": sum(r["joined"] for r in created),
                    "seconds": round(max(r["seconds"] for r in created), 3),
                },
                "join": {
                    "joins": sum(r["joins"] for r in joined),
                    "ok": join_ok,
                    "failures": dict(join_failures.most_common()),
                    "seconds": round(join_span, 3),
                    "rate_per_s": _rate(join_ok, join_span),
                    "latency_ms": percentiles(merge_samples(joined, "latencies_us")),
                    "presences": presences,
                    "presences_expected": sum(r["expected"] for r in settled),
                    "presences_incomplete": sum(r["incomplete"] for r in settled),
                    "settle_seconds": round(settle_span, 3),
                    "presences_per_s": _rate(presences, settle_span),
                },
                "server_rss_kib": {"before_joins": rss_before, "after_joins": rss_after},
                "phases": {"join": phase(a, b, joined)},
            }
            if join_failures:
                broadcast("skip")
            else:
                broadcast("warm")
                collect(conns, "warmed", long)
                c = Snapshot.take(server_pid)
                broadcast("go")
                budget = (
                    plan.messages * sum(len(r.senders) for r in plan.rooms) / plan.rate
                    if plan.rate
                    else 0
                )
                collect(conns, "delivered", long + budget)
                d = Snapshot.take(server_pid)
                done = collect(conns, "done", 120)
                result["messages"] = merge_messages(plan, done)
                result["phases"]["messages"] = phase(c, d, done)
            result["failed"] = bool(join_failures) or result.get("messages", {}).get("failed", True)
            result["warnings"] = size_warnings(result)
            sizes.append(result)
            _progress(result)
            if i + 1 < len(todo):
                broadcast("leave")
                collect(conns, "left", 120)
                time.sleep(args.settle)
            else:
                broadcast("stay")
        broadcast("close")
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
    return {
        "procs": len(groups),
        "window": args.window or None,
        "join_window": args.join_window or None,
        "login": login,
        "sizes": sizes,
    }


def _progress(size: dict[str, Any]) -> None:
    msgs = size.get("messages") or {}
    sys.stderr.write(
        f"bench: size {size['size']}: {size['join']['rate_per_s'] or 0:,.0f} joins/s, "
        f"{msgs.get('delivered_per_s') or 0:,.0f} deliveries/s\n"
    )


# ---------------------------------------------------------------------------------------------
# Report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _workers(figures: dict[str, Any] | None) -> str:
    return "/".join(_pct(x) for x in figures["worker_cpu"]) if figures else "-"


def _server(figures: dict[str, Any] | None) -> str:
    return _pct(figures["server_cpu"]) if figures else "-"


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    _out("  " + "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        _out("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_report(r: dict[str, Any]) -> None:
    t, login, sizes = r["target"], r["login"], r["sizes"]
    senders = sizes[0]["senders_per_room"] if sizes else 0
    mode = (
        f"offered {r['rate']:,.0f} msgs/s in total"
        if r["rate"]
        else f"window {r['window'] or 'unlimited'} per sender"
    )
    _out(
        f"muc: {r['rooms']} room(s) per size, sizes {', '.join(str(s['size']) for s in sizes)};"
        f" {senders} senders per room, {mode}; {r['procs']} worker processes"
    )
    _out(f"  {t['tls']} TLS to {t['host']}:{t['port']} ({t['server']}), MUC {t['muc_domain']}")
    _out(
        f"  logins: {login['ok']} ok, {login['failed']} failed in {login['seconds']:.2f} s"
        f" = {_num(login['rate_per_s'])}/s"
    )
    for reason, count in list(login["failures"].items())[:5]:
        _out(f"    failure: {count} x {reason}")
    _out()
    window = r["join_window"] or "all"
    _out(f"joins (after each room's creator: {window} at a time; CPU in % of one core)")
    head = "size|rooms|new|joined|s|joins/s|p50 ms|p99 ms|presences|all seen s|server|workers"
    rows = []
    for s in sizes:
        j, ph = s["join"], s["phases"]
        rows.append(
            [
                str(s["size"]),
                str(len(s["rooms"])),
                f"{s['create']['created']}/{s['create']['rooms']}",
                f"{j['ok']}/{j['joins']}",
                f"{j['seconds']:.2f}",
                _num(j["rate_per_s"]),
                _num(j["latency_ms"]["p50"], 1),
                _num(j["latency_ms"]["p99"], 1),
                f"{j['presences']:,}",
                f"{j['settle_seconds']:.2f}",
                _server(ph.get("join")),
                _workers(ph.get("join")),
            ]
        )
    _table(head.split("|"), rows)
    for s in sizes:
        for reason, count in list(s["join"]["failures"].items())[:5]:
            _out(f"    size {s['size']}: {count} x {reason}")
    _out()
    _out("messages (deliveries = messages received by occupants, senders' own copies included)")
    head = (
        "size|posts|delivered|s|deliveries/s|10-90 %|posts/s|p50 ms|p99 ms|max ms|lost|dup"
        "|other|server|workers"
    )
    rows = []
    for s in sizes:
        m, ph = s.get("messages"), s["phases"]
        if m is None:
            rows.append([str(s["size"]), "skipped"] + [""] * (head.count("|") - 1))
            continue
        other = m["misrouted"] + m["bounced"] + m["disconnects"] + m["stream_errors"]
        rows.append(
            [
                str(s["size"]),
                f"{m['senders']}x{m['messages_per_sender']}",
                f"{m['delivered']:,}/{m['expected']:,}",
                f"{m['seconds']:.2f}",
                _num(m["delivered_per_s"]),
                _num(m["steady_per_s"]),
                _num(m["sent_per_s"]),
                _num(m["latency_ms"]["p50"], 1),
                _num(m["latency_ms"]["p99"], 1),
                _num(m["latency_ms"]["max"], 1),
                str(m["lost"]),
                str(m["duplicates"]),
                str(other),
                _server(ph.get("messages")),
                _workers(ph.get("messages")),
            ]
        )
    _table(head.split("|"), rows)
    rss = [s for s in sizes if s["server_rss_kib"]["before_joins"] is not None]
    if rss:
        _out()
        for s in rss:
            before, after = s["server_rss_kib"]["before_joins"], s["server_rss_kib"]["after_joins"]
            occupants = s["join"]["ok"] + s["create"]["joined"]
            _out(
                f"  server RSS, size {s['size']}: {before / 1024:.1f} MiB before the joins, "
                f"{(after or 0) / 1024:.1f} MiB with {occupants} occupants"
            )


# ---------------------------------------------------------------------------------------------
# Command line


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 10,100,1000, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("room sizes must be positive")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.muc",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        parents=[common_options()],
    )
    parser.set_defaults(max_pending=100)  # logins are not measured here: spare the backlog
    g = parser.add_argument_group("MUC")
    g.add_argument(
        "--server",
        choices=("natterd", "prosody"),
        default="natterd",
        help="which server to start when there is no --host (default: natterd; prosody: a "
        "private instance, see bench/prosody.py)",
    )
    g.add_argument("--muc-domain", help="the MUC service (default: conference.<domain>)")
    g.add_argument("--sizes", type=_sizes, default=[10, 100, 1000], help="default: 10,100,1000")
    g.add_argument("--rooms", type=int, default=1, help="rooms per size (default: 1)")
    g.add_argument("--senders", type=int, default=4, help="senders per room (default: 4)")
    g.add_argument(
        "-m",
        "--messages",
        type=int,
        default=0,
        help="messages per sender (default: enough for --deliveries deliveries per size)",
    )
    g.add_argument(
        "--deliveries",
        type=int,
        default=40000,
        help="deliveries to aim at per size when -m is not given (default: 40000)",
    )
    g.add_argument("--min-messages", type=int, default=20, help=argparse.SUPPRESS)
    g.add_argument(
        "--window",
        type=int,
        help="messages per sender not yet reflected back to it (default: 2; unlimited with --rate)",
    )
    g.add_argument("--rate", type=float, default=0.0, help="fixed offered rate, posts/s in total")
    g.add_argument(
        "--join-window",
        type=int,
        default=10,
        help="joins in progress at once, over all workers (default: 10; 0: everybody at once)",
    )
    g.add_argument("--timeout", type=float, default=30.0, help="give up after this long idle")
    g.add_argument("--room-prefix", default="room", help="rooms are PREFIX<i>@MUC (default: room)")
    g.add_argument("--first-room", type=int, default=1, help="number of the first room")
    args = parser.parse_args(argv)
    if min(args.procs, args.rooms, args.senders, args.messages + 1, args.deliveries) < 1:
        parser.error("--procs, --rooms, --senders, --messages, --deliveries must be positive")
    if args.window is None:
        args.window = 0 if args.rate else 2
    if args.host is not None and (args.db_url or args.server_set):
        parser.error("--db-url and --server-set are for the server this tool starts")
    if args.server == "prosody" and args.db_url:
        parser.error("--db-url is for natterd")
    if args.server == "prosody":
        for table, key, _ in args.server_set:
            if table not in ("global", "host", "muc"):
                parser.error(
                    f"prosody settings are global.KEY, host.KEY or muc.KEY, not {table}.{key}"
                )
    args.muc_domain = args.muc_domain or f"conference.{args.domain}"
    return args


def _natterd(args: argparse.Namespace, users: int) -> LocalServer:
    from xmpp_server.modules import MODULES

    if "muc" not in MODULES:
        raise RuntimeError("this natterd has no 'muc' module yet: use --server prosody or --host")
    settings: dict[str, dict[str, Any]] = {"modules.muc": {"enabled": True}}
    if args.muc_domain != f"conference.{args.domain}":
        settings["modules.muc"]["host"] = args.muc_domain
    for table, key, value in args.server_set:
        settings.setdefault(table, {})[key] = value
    server = LocalServer(args.domain, args.db_url, args.keep, settings)
    server.start(users, args.user_prefix, args.password)
    return server


def _prosody(args: argparse.Namespace, users: int) -> ProsodyServer:
    tables: dict[str, dict[str, Any]] = {"global": {}, "host": {}, "muc": {}}
    for table, key, value in args.server_set:
        tables[table][key] = value
    server = ProsodyServer(
        args.domain,
        args.keep,
        muc_domain=args.muc_domain,
        settings=tables["global"],
        host_settings=tables["host"],
        muc_settings=tables["muc"],
    )
    server.start(users, args.user_prefix, args.password)
    return server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()  # inherited by the server and the workers
    # SIGTERM unwinds like Ctrl-C, so the server of our own is stopped and its directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    users = args.rooms * max(args.sizes)
    server: LocalServer | ProsodyServer | None = None
    settings = [f"{t}.{k}={toml_value(v)}" for t, k, v in args.server_set]
    try:
        if args.host is None:
            if args.server == "prosody":
                server = _prosody(args, users)
                label = f"self-started prosody {server.version()}".rstrip()
            else:
                server = _natterd(args, users)
                label = "self-started natterd"
            label += "".join(f", {s}" for s in settings)
        else:
            label = "external server"
        target = target_of(args, server)
        pid = server.pid if server is not None else args.server_pid
        result = orchestrate(args, target, args.muc_domain, pid)
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        if server is not None and server.proc is not None:
            sys.stderr.write(f"server log (last lines):\n{server.log_tail()}\n")
        return 2
    finally:
        if server is not None:
            server.stop()
    result.update(
        rooms=args.rooms,
        rate=args.rate or None,
        target={
            "host": target.host,
            "port": target.port,
            "tls": args.tls,
            "domain": args.domain,
            "muc_domain": args.muc_domain,
            "server": label,
            "self_started": args.host is None,
        },
    )
    warnings = [w for s in result["sizes"] for w in s["warnings"]]
    login = result["login"]
    result["warnings"] = warnings
    for warning in warnings:
        _warn(warning)
    if args.json:
        _out(json.dumps(result, indent=2))
    else:
        print_report(result)
    failed = login["failed"] or any(s["failed"] for s in result["sizes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
