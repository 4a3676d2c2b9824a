"""What runs inside a NAT lab namespace (``ip netns exec <ns> python agent.py ...``).

It speaks JSON lines: results on stdout, input on stdin; closing stdin stops it.

``probe HOST:PORT...``: STUN binding requests from one UDP socket to each server in turn, printing
``{"local": [ip, port], "mapped": [[ip, port], ...]}``; every response is checked (transaction id,
XOR-MAPPED-ADDRESS present).

``ice ...``: an aioice agent. It prints ``{"ufrag", "pwd", "candidates"}`` once gathered, reads
the remote side's line, connects within ``--deadline`` seconds, exchanges a message with the
other agent over the selected pair and prints ``{"connected": true, "local": {...}, "remote":
{...}, "received": "..."}`` (or ``{"connected": false, ...}``), then keeps answering until its
stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
from typing import Any

from aioice import Candidate, Connection, stun


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def binding(sock: socket.socket, server: tuple[str, int], timeout: float = 5.0) -> tuple[str, int]:
    """One STUN binding transaction (retransmitted every 250 ms) over a blocking socket."""
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(bytes(request), server)
        sock.settimeout(0.25)
        try:
            while True:
                data, source = sock.recvfrom(2048)
                try:
                    response = stun.parse_message(data)
                except ValueError:
                    continue
                if response.transaction_id != request.transaction_id or source != server:
                    continue
                if response.message_class != stun.Class.RESPONSE:
                    raise RuntimeError(f"binding error from {server}: {response}")
                mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
                if mapped is None:
                    raise RuntimeError(f"no XOR-MAPPED-ADDRESS from {server}: {response}")
                return mapped[0], mapped[1]
        except TimeoutError:
            continue
    raise TimeoutError(f"no binding response from {server}")


def probe(servers: list[tuple[str, int]]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        mapped = [binding(sock, server) for server in servers]
        say({"local": list(sock.getsockname()), "mapped": [list(m) for m in mapped]})


def describe(candidate: Candidate) -> dict[str, Any]:
    return {"type": candidate.type, "host": candidate.host, "port": candidate.port}


async def ice(args: argparse.Namespace) -> None:
    stdin = await stdin_reader()
    connection = Connection(
        ice_controlling=args.role == "controlling",
        stun_server=address(args.stun) if args.stun else None,
        turn_server=address(args.turn) if args.turn else None,
        turn_username=args.username,
        turn_password=args.password,
        use_ipv6=False,
    )
    try:
        await connection.gather_candidates()
        say(
            {
                "ufrag": connection.local_username,
                "pwd": connection.local_password,
                "candidates": [c.to_sdp() for c in connection.local_candidates],
            }
        )
        remote = json.loads(await stdin.readline())
        connection.remote_username = remote["ufrag"]
        connection.remote_password = remote["pwd"]
        for sdp in remote["candidates"]:
            await connection.add_remote_candidate(Candidate.from_sdp(sdp))
        await connection.add_remote_candidate(None)
        started = time.monotonic()
        try:
            await asyncio.wait_for(connection.connect(), args.deadline)
        except (TimeoutError, ConnectionError) as exc:
            say({"connected": False, "error": repr(exc), "after": time.monotonic() - started})
            await stdin.read()
            return
        pair = connection._nominated[1]
        hello = f"hello from {args.role}".encode()

        async def keep_saying_hello() -> None:
            while True:
                await connection.send(hello)
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(keep_saying_hello())
        try:
            received = await asyncio.wait_for(connection.recv(), args.deadline)
        except TimeoutError:
            received = b""
        say(
            {
                "connected": True,
                "after": time.monotonic() - started,
                "local": describe(pair.local_candidate),
                "remote": describe(pair.remote_candidate),
                "received": received.decode(errors="replace"),
            }
        )
        await stdin.read()  # keep the path open until the test is done with both sides
        sender.cancel()
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe")
    probe_parser.add_argument("servers", nargs="+", type=address)
    ice_parser = commands.add_parser("ice")
    ice_parser.add_argument("--role", choices=["controlling", "controlled"], required=True)
    ice_parser.add_argument("--stun")
    ice_parser.add_argument("--turn")
    ice_parser.add_argument("--username")
    ice_parser.add_argument("--password")
    ice_parser.add_argument("--deadline", type=float, default=10.0)
    ice_parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    if getattr(args, "debug", False):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    if args.command == "probe":
        probe(args.servers)
    else:
        asyncio.run(ice(args))


if __name__ == "__main__":
    main()
