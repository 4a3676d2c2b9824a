"""Offline store and flush rates through a real natterd, on SQLite and on PostgreSQL.

``python -m bench.offline [--pairs P] [--messages M] [--backends sqlite,postgres]``

Store: P senders each send M chat messages to a partner who is offline, then an iq ping;
a stanza is processed in order on its connection, so when every ping is answered every
message is committed to the offline queue (the server acknowledges only then).
Flush: the P recipients log in; the clock runs from their logins until each has received
its M messages. Every message is checked: all present, none doubled, in order.

Ack rate (``--ack-messages N``, 0 to skip): one sender with stream management (XEP-0198)
sends N chat messages to an offline user, each followed by ``<r/>`` as a client that wants
every message confirmed does; the clock runs until ``<a h='N'/>``. The server acknowledges a
message only once it is in durable storage, so this is the rate one phone's outbox empties
at. The server's CPU seconds over that phase, divided by N, give its CPU per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bench.archive import DEFAULT_POSTGRES_URL, postgres_database
from bench.load import Client, LocalServer, Target, attr, client_context, login, process_cpu

PREFIX = "off"
PASSWORD = "bench password"
DOMAIN = "localhost"
_BODY = re.compile(rb"<body>(\d+) (\d+)</body>")


def _out(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201 - a benchmark reports on stdout


@asynccontextmanager
async def backend(name: str) -> AsyncIterator[str | None]:
    if name == "sqlite":
        yield None  # LocalServer makes its own SQLite file
        return
    admin = os.environ.get("NATTER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    async with postgres_database(admin) as url:
        yield url


async def run(name: str, pairs: int, messages: int, acks: int) -> dict[str, float]:
    async with backend(name) as url:
        server = LocalServer(DOMAIN, url, keep=False)
        await asyncio.to_thread(server.start, 2 * pairs + 2, PREFIX, PASSWORD)
        try:
            result = await measure(server, pairs, messages)
            if acks:
                result.update(await ack_rate(server, pairs, acks))
            return result
        finally:
            await asyncio.to_thread(server.stop)


def bench_target(server: LocalServer) -> Target:
    return Target(
        host="127.0.0.1",
        port=server.tls_port,
        domain=DOMAIN,
        tls="direct",
        cafile=server.cafile,
        insecure=False,
        user_prefix=PREFIX,
        password=PASSWORD,
        login_timeout=60,
    )


async def ack_rate(server: LocalServer, pairs: int, count: int) -> dict[str, float]:
    """One SM sender, ``count`` messages to an offline user, each followed by ``<r/>``."""
    target = bench_target(server)
    sender = Client(2 * pairs + 1)
    await login(sender, target, client_context(target))
    sender.send(b"<enable xmlns='urn:xmpp:sm:3'/>")
    while not (await sender.next_element()).startswith(b"<enabled"):
        pass
    done = asyncio.Event()

    def on_element(el: bytes) -> None:
        if el.startswith(b"<a ") and int(attr(el, b"h") or b"0") >= count:
            done.set()

    sender.dispatch(on_element, lambda: None)
    partner = f"{PREFIX}{2 * pairs + 2}@{DOMAIN}".encode()
    cpu0, start = process_cpu(server.pid), time.perf_counter()
    sender.send(
        b"".join(
            b"<message type='chat' to='%s'><body>ack %d</body></message>"
            b"<r xmlns='urn:xmpp:sm:3'/>" % (partner, i)
            for i in range(count)
        )
    )
    await asyncio.wait_for(done.wait(), 600)
    seconds, cpu1 = time.perf_counter() - start, process_cpu(server.pid)
    sender.close()
    cpu_us = (cpu1 - cpu0) / count * 1e6 if cpu0 is not None and cpu1 is not None else -1.0
    return {"acks_per_s": count / seconds, "ack_cpu_us": cpu_us}


async def measure(server: LocalServer, pairs: int, messages: int) -> dict[str, float]:
    target = bench_target(server)
    context = client_context(target)
    senders = [Client(i) for i in range(1, pairs + 1)]
    await asyncio.gather(*(login(c, target, context) for c in senders))
    answered = 0
    done = asyncio.Event()

    def on_sender_element(el: bytes) -> None:
        nonlocal answered
        if el.startswith(b"<iq") and b'id="flushed"' in el.replace(b"'", b'"'):
            answered += 1
            if answered == pairs:
                done.set()

    start = time.perf_counter()
    for sender in senders:
        sender.dispatch(on_sender_element, lambda: None)
        partner = f"{PREFIX}{sender.number + pairs}@{DOMAIN}".encode()
        chunk = b"".join(
            b"<message type='chat' to='%s'><body>%d %d</body></message>"
            % (partner, sender.number, i)
            for i in range(messages)
        )
        sender.send(chunk + b"<iq type='get' id='flushed'><ping xmlns='urn:xmpp:ping'/></iq>")
    await asyncio.wait_for(done.wait(), 600)
    store_seconds = time.perf_counter() - start
    for sender in senders:
        sender.close()

    received: dict[int, list[int]] = {}
    complete = asyncio.Event()
    finished = 0
    recipients = [Client(i) for i in range(pairs + 1, 2 * pairs + 1)]

    def on_recipient(client: Client) -> tuple[object, object]:
        seen = received.setdefault(client.number, [])

        def on_element(el: bytes) -> None:
            nonlocal finished
            m = _BODY.search(el)
            if el.startswith(b"<message") and m:
                seen.append(int(m.group(2)))
                if len(seen) == messages:
                    finished += 1
                    if finished == pairs:
                        complete.set()

        return on_element, lambda: None

    start = time.perf_counter()

    async def login_and_listen(client: Client) -> None:
        await login(client, target, context)
        on_element, on_batch = on_recipient(client)
        client.dispatch(on_element, on_batch)  # type: ignore[arg-type]

    await asyncio.gather(*(login_and_listen(c) for c in recipients))
    await asyncio.wait_for(complete.wait(), 600)
    flush_seconds = time.perf_counter() - start
    for client in recipients:
        client.close()
    errors = sum(1 for seq in received.values() if seq != list(range(messages)))
    total = pairs * messages
    return {
        "messages": total,
        "store_per_s": total / store_seconds,
        "flush_per_s": total / flush_seconds,
        "out_of_order_or_missing": errors,
    }


async def main_async(args: argparse.Namespace) -> int:
    _out(f"offline queue: {args.pairs} senders x {args.messages} messages to offline partners")
    if args.ack_messages:
        _out(f"ack rate: 1 sender with XEP-0198, {args.ack_messages} messages, <r/> after each")
    _out(
        f"{'backend':<10} {'messages':>9} {'store msg/s':>12} {'flush msg/s':>12} {'bad':>4}"
        f" {'acks/s':>8} {'CPU us/ack':>10}"
    )
    bad = 0
    for name in args.backends.split(","):
        r = await run(name, args.pairs, args.messages, args.ack_messages)
        bad += int(r["out_of_order_or_missing"])
        _out(
            f"{name:<10} {int(r['messages']):>9} {r['store_per_s']:>12.0f} "
            f"{r['flush_per_s']:>12.0f} {int(r['out_of_order_or_missing']):>4}"
            f" {r.get('acks_per_s', 0):>8.0f} {r.get('ack_cpu_us', 0):>10.0f}"
        )
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--messages", type=int, default=500, help="per sender (max 1000)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--ack-messages", type=int, default=1000, help="one SM sender's messages (0: skip)"
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
