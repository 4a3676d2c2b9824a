"""How many relayed 1:1 calls does the relay carry? Loss and added latency per load.

``python -m bench.calls`` runs, for each size in ``--calls``, a fresh relay process
(:class:`voip.relay.Relay`, the media anchor natterd runs in ``media = "relay"``) and
generator processes that place that many calls through it. Each call is two aiortc peer
connections in a generator (caller and callee), each leg of the relay answers one of them,
and audio flows both ways at 50 packets/s (20 ms Opus), DTLS-SRTP, ICE, RTP+RTCP on one port:
what a phone does. The signalling is left out (SDP goes over a local socket) so that only the
media path is measured.

The generators send pre-encoded Opus (no encoder in the generator): near-silent packets with
one loud packet every 500 ms. A loud packet's encoded size gives it away at the receiver, even
after the relay decoded and re-encoded it (``--mode transcode``: a re-encoded silence frame is
a few bytes, a loud one over a hundred), so the generator measures one-way latency without
decoding anything: from the moment the loud packet left the sender to the moment the first
loud packet reaches the peer. ``--mode direct`` connects the two endpoints without the relay,
which gives the baseline that "added latency" is measured against. Loss is packets sent minus
packets received per direction over the measured window (after ``--warmup`` seconds).

The report gives, per size: calls connected, loss, latency p50/p99, relay CPU (of one core)
and generator CPU; and the largest size with every call connected and loss < 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import multiprocessing
import os
import sys
import tempfile
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.load import _out, _warn, cpu_seconds, percentiles, process_cpu

PTIME = 0.02
MARK_EVERY = 25  # packets: one loud packet every 500 ms
LOUD_BYTES = 40  # a payload at least this big is a loud packet (silence is ~3-10 bytes)


# ---------------------------------------------------------------------------------------------
# Opus payloads, made once


def opus_payloads() -> tuple[bytes, bytes]:
    """(a near-silent packet, a loud packet) from libopus at 48 kHz, 20 ms, stereo."""
    import av
    import numpy as np

    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "stereo"
    codec.format = av.AudioFormat("s16")
    codec.bit_rate = 64000
    codec.open()
    rng = np.random.default_rng(1)
    samples = 960

    def encode(loud: bool, count: int) -> list[bytes]:
        out = []
        for i in range(count):
            if loud:
                data = rng.integers(-20000, 20000, (1, samples * 2), dtype=np.int16)
            else:
                data = np.zeros((1, samples * 2), dtype=np.int16)
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
            frame.sample_rate = 48000
            frame.pts = i * samples
            out += [bytes(p) for p in codec.encode(frame)]
        return out

    quiet = encode(False, 10)[-1]
    loud = encode(True, 10)[-1]
    if len(quiet) >= LOUD_BYTES or len(loud) < LOUD_BYTES:
        raise RuntimeError(f"unexpected Opus sizes: silence {len(quiet)}, loud {len(loud)}")
    return quiet, loud


# ---------------------------------------------------------------------------------------------
# The relay process


def relay_main(path: str, passthrough: bool, conn: Connection) -> None:
    """Serve ``open``/``accept`` (SDP) on a unix socket, one JSON object per line."""
    from voip.relay import Relay

    async def run() -> None:
        relay = Relay(passthrough=passthrough, media_timeout=120.0)
        calls: dict[str, Any] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                request = json.loads(line)
                try:
                    if request["op"] == "open":
                        call, offer = await relay.open(
                            request["sid"], "caller@bench/a", "callee@bench/b", request["sdp"]
                        )
                        calls[request["sid"]] = call
                        reply = {"sdp": offer}
                    else:
                        reply = {"sdp": await relay.accept(calls[request["sid"]], request["sdp"])}
                except Exception as exc:  # noqa: BLE001 - reported to the generator
                    reply = {"error": repr(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()

        server = await asyncio.start_unix_server(serve, path)
        conn.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        server.close()
        records = [await relay.hangup(call) for call in list(calls.values())]
        await relay.close()
        conn.send({"calls": len(records)})

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# The generator: calls of two endpoints each


class Direction:
    """One way of one call: what was sent and what arrived, and the loud-packet clock."""

    __slots__ = ("sent", "received", "mark_sent_ns", "in_mark", "latencies_us", "counting")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.mark_sent_ns = 0
        self.in_mark = False
        self.latencies_us = array("q")
        self.counting = False

    def arrived(self, size: int) -> None:
        if self.counting:
            self.received += 1
        loud = size >= LOUD_BYTES
        if loud and not self.in_mark and self.mark_sent_ns:
            elapsed = time.perf_counter_ns() - self.mark_sent_ns
            if self.counting and elapsed < MARK_EVERY * PTIME * 1e9:
                self.latencies_us.append(elapsed // 1000)
        self.in_mark = loud


def _track_class() -> type:
    from aiortc.mediastreams import MediaStreamTrack

    class PacketTrack(MediaStreamTrack):
        """Pre-encoded Opus at 50 packets/s on a shared clock; every 25th packet is loud."""

        kind = "audio"

        def __init__(self, quiet: bytes, loud: bytes, direction: Direction, start: float) -> None:
            super().__init__()
            self.quiet, self.loud, self.direction = quiet, loud, direction
            self.start = start
            self.count = 0

        async def recv(self) -> Any:
            import av

            due = self.start + self.count * PTIME
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            loud = self.count % MARK_EVERY == MARK_EVERY - 1
            packet = av.Packet(self.loud if loud else self.quiet)
            packet.pts = self.count * 960
            packet.time_base = fractions.Fraction(1, 48000)
            self.count += 1
            d = self.direction
            if d.counting:
                d.sent += 1
            if loud:
                d.mark_sent_ns = time.perf_counter_ns()
            return packet

    return PacketTrack


class _Counter:
    """Replaces a receiver's decoder queue: counts payloads instead of decoding them."""

    def __init__(self, original: Any, direction: Direction) -> None:
        self.original = original
        self.direction = direction

    def get(self) -> Any:
        return self.original.get()

    def put(self, item: Any) -> None:
        if item is None:
            self.original.put(None)
            return
        self.direction.arrived(len(item[1].data))


def _count(pc: Any, track: Any, direction: Direction) -> None:
    from voip.relay import swap_decoder_queue

    swap_decoder_queue(pc, track, lambda queue: _Counter(queue, direction))


async def _relay_request(path: str, request: dict[str, Any]) -> str:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        reply = json.loads(await reader.readline())
    finally:
        writer.close()
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return str(reply["sdp"])


async def _call(
    index: int, relay: str | None, payloads: tuple[bytes, bytes], start: float
) -> tuple[Any, Any, Direction, Direction]:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    track_class = _track_class()
    forward, backward = Direction(), Direction()  # caller->callee, callee->caller
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    caller.on("track", lambda t: _count(caller, t, backward))
    callee.on("track", lambda t: _count(callee, t, forward))
    caller.addTrack(track_class(*payloads, forward, start))
    await caller.setLocalDescription(await caller.createOffer())
    offer = caller.localDescription.sdp
    sid = f"call{os.getpid()}-{index}"
    if relay is not None:
        offer = await _relay_request(relay, {"op": "open", "sid": sid, "sdp": offer})
    await callee.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    callee.addTrack(track_class(*payloads, backward, start))
    await callee.setLocalDescription(await callee.createAnswer())
    answer = callee.localDescription.sdp
    if relay is not None:
        answer = await _relay_request(relay, {"op": "accept", "sid": sid, "sdp": answer})
    await caller.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return caller, callee, forward, backward


def generator_main(spec: dict[str, Any], conn: Connection) -> None:
    async def run() -> dict[str, Any]:
        payloads = opus_payloads()
        start = time.monotonic() + 0.5
        results = await asyncio.gather(
            *(_call(i, spec["relay"], payloads, start) for i in range(spec["calls"])),
            return_exceptions=True,
        )
        calls = [r for r in results if not isinstance(r, BaseException)]
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        deadline = time.monotonic() + spec["connect_timeout"]
        while time.monotonic() < deadline:
            if all(pc.connectionState == "connected" for c in calls for pc in c[:2]):
                break
            await asyncio.sleep(0.1)
        connected = sum(all(pc.connectionState == "connected" for pc in c[:2]) for c in calls)
        await asyncio.sleep(spec["warmup"])
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        directions = [d for c in calls for d in c[2:]]
        for d in directions:
            d.counting = True
        conn.send("measuring")
        await asyncio.sleep(spec["seconds"])
        for d in directions:
            d.counting = False
        cpu = (cpu_seconds() - cpu0) / (time.monotonic() - wall0)
        await asyncio.sleep(0.3)  # the last packets in flight
        latencies = array("q")
        for d in directions:
            latencies.extend(d.latencies_us)
        sent = sum(d.sent for d in directions)
        received = sum(d.received for d in directions)
        for c in calls:
            for pc in c[:2]:
                with contextlib.suppress(Exception):
                    await pc.close()
        return {
            "calls": spec["calls"],
            "connected": connected,
            "errors": errors,
            "sent": sent,
            "received": received,
            "latencies_us": latencies.tobytes(),
            "cpu": cpu,
        }

    conn.send(asyncio.run(run()))


# ---------------------------------------------------------------------------------------------
# The parent


def measure(mode: str, calls: int, options: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="natter-bench-calls-"))
    path = str(tmp / "relay.sock")
    relay_proc = None
    relay_conn = None
    procs: list[Any] = []
    try:
        if mode != "direct":
            relay_conn, child = ctx.Pipe()
            relay_proc = ctx.Process(
                target=relay_main, args=(path, mode == "passthrough", child), daemon=True
            )
            relay_proc.start()
            if not relay_conn.poll(60) or relay_conn.recv() != "ready":
                raise RuntimeError("the relay did not start")
        shares = [
            calls // options.procs + (i < calls % options.procs) for i in range(options.procs)
        ]
        conns = []
        for share in shares:
            if not share:
                continue
            parent, child = ctx.Pipe()
            spec = {
                "relay": path if mode != "direct" else None,
                "calls": share,
                "warmup": options.warmup,
                "seconds": options.seconds,
                "connect_timeout": options.connect_timeout,
            }
            proc = ctx.Process(target=generator_main, args=(spec, child), daemon=True)
            proc.start()
            procs.append(proc)
            conns.append(parent)
        budget = options.connect_timeout + options.warmup + 120
        for c in conns:
            if not c.poll(budget) or c.recv() != "measuring":
                raise RuntimeError("a generator did not get its calls going")
        relay_cpu0, wall0 = process_cpu(relay_proc.pid if relay_proc else None), time.monotonic()
        parts = []
        for c in conns:
            if not c.poll(options.seconds + 120):
                raise RuntimeError("a generator did not report")
            parts.append(c.recv())
        relay_cpu1 = process_cpu(relay_proc.pid if relay_proc else None)
        wall = time.monotonic() - wall0
        if relay_conn is not None:
            relay_conn.send("stop")
            relay_conn.poll(60)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        if relay_proc is not None:
            relay_proc.join(10)
            if relay_proc.is_alive():
                relay_proc.terminate()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    latencies = array("q")
    for part in parts:
        chunk = array("q")
        chunk.frombytes(part["latencies_us"])
        latencies.extend(chunk)
    sent = sum(p["sent"] for p in parts)
    received = sum(p["received"] for p in parts)
    return {
        "mode": mode,
        "calls": calls,
        "connected": sum(p["connected"] for p in parts),
        "errors": [e for p in parts for e in p["errors"]],
        "sent": sent,
        "received": received,
        "loss": round(max(0, sent - received) / sent, 4) if sent else None,
        "latency_ms": percentiles(latencies),
        "relay_cpu": (
            round((relay_cpu1 - relay_cpu0) / wall, 3)
            if relay_cpu0 is not None and relay_cpu1 is not None
            else None
        ),
        "generator_cpu": [round(p["cpu"], 3) for p in parts],
    }


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The largest size with every call connected and loss under 1 %."""
    good = [
        r
        for r in rows
        if r["connected"] == r["calls"] and r["loss"] is not None and r["loss"] < 0.01
    ]
    return max(good, key=lambda r: r["calls"]) if good else None


def print_report(result: dict[str, Any]) -> None:
    _out(
        f"{'mode':>11} {'calls':>5} {'up':>5} {'loss':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'relay CPU':>9}  generator CPU"
    )
    for r in result["rows"]:
        lat = r["latency_ms"]
        _out(
            f"{r['mode']:>11} {r['calls']:>5} {r['connected']:>5} {r['loss'] or 0:>7.2%}"
            f" {lat['p50'] or 0:>7.1f} {lat['p99'] or 0:>7.1f}"
            f" {'-' if r['relay_cpu'] is None else format(r['relay_cpu'], '.0%'):>9}  "
            + " ".join(f"{c:.0%}" for c in r["generator_cpu"])
        )
    base = result.get("baseline")
    for mode, top in result["best"].items():
        if top is None:
            _out(f"{mode}: no size kept loss under 1 %")
            continue
        added = ""
        if base and base["latency_ms"]["p50"] is not None:
            added = (
                f", added latency p50 {top['latency_ms']['p50'] - base['latency_ms']['p50']:.1f} ms"
                f" p99 {top['latency_ms']['p99'] - base['latency_ms']['p99']:.1f} ms"
            )
        _out(f"{mode}: {top['calls']} concurrent calls with loss {top['loss']:.2%}{added}")


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.split("\n")[0])
    p.add_argument(
        "--mode",
        action="append",
        choices=("passthrough", "transcode"),
        help="relay forwarding (repeatable; default both)",
    )
    p.add_argument("--calls", default="5,10,20,30", help="passthrough sizes, comma-separated")
    p.add_argument("--transcode-calls", default="2,4,6,8", help="transcode sizes")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per size")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--stop-at-loss", type=float, default=0.05, help="skip larger sizes above")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    modes = options.mode or ["passthrough", "transcode"]
    sizes = {
        "passthrough": [int(x) for x in options.calls.split(",")],
        "transcode": [int(x) for x in options.transcode_calls.split(",")],
    }
    rows: list[dict[str, Any]] = []
    try:
        baseline = measure("direct", 1, options)
        rows.append(baseline)
        for mode in modes:
            for n in sizes[mode]:
                row = measure(mode, n, options)
                rows.append(row)
                if row["loss"] is None or row["loss"] > options.stop_at_loss:
                    break
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    result = {
        "rows": rows,
        "baseline": baseline,
        "best": {mode: best([r for r in rows if r["mode"] == mode]) for mode in modes},
        "cores": os.cpu_count(),
    }
    for r in rows:
        if r["errors"]:
            _warn(f"{r['mode']} {r['calls']}: {len(r['errors'])} calls failed: {r['errors'][0]}")
        if any(c > 0.85 for c in r["generator_cpu"]):
            _warn(f"{r['mode']} {r['calls']}: a generator used > 85 % of a core; add --procs")
    if options.json:
        _out(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
