"""Does file sharing stall chat? One-to-one chat latency with and without concurrent uploads.

``python -m bench.upload`` starts a natterd of its own (HTTP on, thumbnails on), then runs the
same open-loop chat twice with ``bench.load``'s raw-socket clients: once alone, once while
``--uploaders`` other users each upload a ``--size`` MB JPEG over and over (XEP-0363 slot over
XMPP, HTTPS PUT, which makes the server hash, thumbnail and store it). If the upload path
blocked the event loop, the second run's p99 would show it: a 5 MB body takes the loop
through ~80 reads, a hash, a Pillow decode and a file move.

Every upload is checked: 201 from the PUT, and the first one of each uploader is fetched back
and compared byte for byte. Chat messages are checked exactly once as in ``bench.load``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import multiprocessing
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.load import (
    Client,
    LocalServer,
    Target,
    _out,
    _warn,
    attr,
    client_context,
    cpu_seconds,
    free_ports,
    login,
    orchestrate,
    parse_args,
    percentiles,
    provision,
    raise_nofile_limit,
    target_of,
)

NS_UPLOAD = "urn:xmpp:http:upload:0"
UPLOADER_PREFIX = "up"


def make_jpeg(megabytes: float) -> bytes:
    """A noise JPEG of about ``megabytes`` MB: noise barely compresses, so the decode that
    the thumbnail needs is as expensive as a real photo of that size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    target = int(megabytes * 1_000_000)
    side = int((target / 1.1) ** 0.5)  # noise at quality 90 costs about 1.1 bytes per pixel
    for _ in range(6):
        pixels = rng.integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        if abs(len(data) - target) < target * 0.05:
            break
        side = int(side * (target / len(data)) ** 0.5)
    return data


async def request_slot(client: Client, number: int, size: int, domain: str) -> tuple[str, str]:
    """XEP-0363 §4: ask the server (the domain) for a slot; returns (put URL, get URL)."""
    iq_id = f"slot{number}".encode()
    client.send(
        b"<iq type='get' to='"
        + domain.encode()
        + b"' id='"
        + iq_id
        + b"'><request xmlns='"
        + NS_UPLOAD.encode()
        + f"' filename='photo{number}.jpg' size='{size}' content-type='image/jpeg'/></iq>".encode()
    )
    while True:
        el = await client.next_element()
        if el.startswith(b"<iq") and attr(el, b"id") == iq_id:
            break
    if attr(el, b"type") != b"result":
        raise RuntimeError(f"slot refused: {el[:300]!r}")
    slot = ET.fromstring(el).find(f"{{{NS_UPLOAD}}}slot")
    put = slot.find(f"{{{NS_UPLOAD}}}put") if slot is not None else None
    get = slot.find(f"{{{NS_UPLOAD}}}get") if slot is not None else None
    if put is None or get is None:
        raise RuntimeError(f"no slot in {el[:300]!r}")
    return put.get("url", ""), get.get("url", "")


async def _uploader(
    number: int, target: Target, body: bytes, stop: asyncio.Event, out: dict[str, Any]
) -> None:
    import aiohttp

    context = client_context(target)
    client = Client(number)
    await login(client, target, context)
    digest = hashlib.sha256(body).digest()
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as http:
        first = True
        while not stop.is_set():
            started = time.perf_counter_ns()
            put_url, get_url = await request_slot(client, out["uploads"], len(body), target.domain)
            async with http.put(
                put_url, data=body, headers={"Content-Type": "image/jpeg"}
            ) as response:
                if response.status != 201:
                    out["errors"].append(f"PUT {response.status}: {await response.text()}")
                    return
            out["put_ms"].append((time.perf_counter_ns() - started) // 1000)
            out["uploads"] += 1
            out["bytes"] += len(body)
            if first:
                first = False
                async with http.get(get_url) as response:
                    if hashlib.sha256(await response.read()).digest() != digest:
                        out["errors"].append(f"GET {get_url} returned other bytes")
            out["started"].set()
    assert client.transport is not None
    client.transport.close()


def uploader_main(target: Target, numbers: list[int], image: str, conn: Connection) -> None:
    """A process of uploaders: signals "uploading" after the first completed upload of all,
    keeps uploading until told "stop", then sends its figures."""

    async def run() -> dict[str, Any]:
        body = Path(image).read_bytes()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        per: list[dict[str, Any]] = [
            {
                "uploads": 0,
                "bytes": 0,
                "errors": [],
                "put_ms": array("q"),
                "started": asyncio.Event(),
            }
            for _ in numbers
        ]
        tasks = [
            asyncio.create_task(_uploader(n, target, body, stop, p))
            for n, p in zip(numbers, per, strict=True)
        ]

        # Measure only once every uploader is busy (or one has already failed).
        async def all_started() -> None:
            for p in per:
                await p["started"].wait()

        waiter = asyncio.ensure_future(all_started())
        await asyncio.wait([waiter, *tasks], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        conn.send("uploading")
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        await loop.run_in_executor(None, conn.recv)  # "stop"
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [e for p in per for e in p["errors"]]
        errors += [repr(r) for r in results if isinstance(r, BaseException)]
        put_ms = array("q")
        for p in per:
            put_ms.extend(p["put_ms"])
        return {
            "uploads": sum(p["uploads"] for p in per),
            "bytes": sum(p["bytes"] for p in per),
            "errors": errors,
            "put_us": put_ms.tobytes(),
            "cpu": (cpu_seconds() - cpu0) / max(time.monotonic() - wall0, 1e-9),
        }

    conn.send(asyncio.run(run()))


def chat_args(options: argparse.Namespace) -> argparse.Namespace:
    argv = [
        "chat",
        "-c",
        str(options.clients),
        "-m",
        str(options.messages),
        "--rate",
        str(options.rate),
        "--procs",
        str(options.procs),
    ]
    return parse_args(argv)


def measure(options: argparse.Namespace) -> dict[str, Any]:
    size = int(options.size * 1_000_000)
    http_port, https_port = free_ports(2)
    settings: dict[str, dict[str, Any]] = {
        "http": {"enabled": True, "host": "127.0.0.1", "port": http_port, "tls_port": https_port},
        "modules.upload": {"max_file_size": size * 2, "quota_per_user": 0},
    }
    server = LocalServer("localhost", options.db_url, options.keep, settings)
    workdir = Path(tempfile.mkdtemp(prefix="natter-bench-upload-"))
    image = workdir / "photo.jpg"
    image.write_bytes(make_jpeg(options.size))
    try:
        server.start(options.clients, "u", "bench-password")
        asyncio.run(
            provision(server.url, "localhost", UPLOADER_PREFIX, "bench-password", options.uploaders)
        )
        args = chat_args(options)
        target = target_of(args, server)
        result: dict[str, Any] = {"image_bytes": image.stat().st_size, "runs": []}
        for _ in range(options.runs):
            quiet = orchestrate(args, target, server.pid)
            up_target = Target(**{**target.__dict__, "user_prefix": UPLOADER_PREFIX})
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=uploader_main,
                args=(up_target, list(range(1, options.uploaders + 1)), str(image), child),
                daemon=True,
            )
            proc.start()
            if not parent.poll(180) or parent.recv() != "uploading":
                raise RuntimeError("the uploaders did not start")
            t0 = time.monotonic()
            loaded = orchestrate(args, target, server.pid)
            parent.send("stop")
            up = parent.recv() if parent.poll(180) else {"errors": ["no report"], "uploads": 0}
            wall = time.monotonic() - t0
            proc.join(10)
            result["runs"].append(summary(quiet, loaded, up, wall))
        return result
    finally:
        server.stop()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def summary(
    quiet: dict[str, Any], loaded: dict[str, Any], up: dict[str, Any], wall: float
) -> dict[str, Any]:
    put_us = array("q")
    put_us.frombytes(up.get("put_us", b""))
    return {
        "without": _chat(quiet),
        "with": _chat(loaded),
        "uploads": up.get("uploads", 0),
        "uploads_per_s": round(up.get("uploads", 0) / wall, 2),
        "upload_mb_per_s": round(up.get("bytes", 0) / wall / 1e6, 1),
        "upload_ms": percentiles(put_us),
        "upload_errors": up.get("errors", []),
        "uploader_cpu": round(up.get("cpu", 0.0), 3),
    }


def _chat(result: dict[str, Any]) -> dict[str, Any]:
    chat = result["chat"]
    return {
        "delivered_per_s": chat["delivered_per_s"],
        "latency_ms": chat["latency_ms"],
        "lost": chat["lost"],
        "duplicates": chat["duplicates"],
        "failed": chat["failed"],
        "server_cpu": result["phases"]["chat"]["server_cpu"],
        "warnings": result["warnings"],
    }


def print_report(options: argparse.Namespace, result: dict[str, Any]) -> None:
    _out(
        f"chat: {options.clients} clients, {options.rate:,.0f} msgs/s offered, "
        f"{options.messages} per sender; uploads: {options.uploaders} users x "
        f"{result['image_bytes'] / 1e6:.1f} MB JPEG, back to back"
    )
    _out(f"{'run':>3}  {'uploads':>16}  {'chat p50 / p99 / max ms':>28}  lost dup  server CPU")
    for i, run in enumerate(result["runs"], 1):
        for label in ("without", "with"):
            c = run[label]
            lat = c["latency_ms"]
            load = (
                f"{run['uploads_per_s']:.1f}/s {run['upload_mb_per_s']:.0f} MB/s"
                if label == "with"
                else "none"
            )
            _out(
                f"{i:>3}  {load:>16}  {lat['p50']:>8.1f} / {lat['p99']:>6.1f} / {lat['max']:>7.1f}"
                f"  {c['lost']:>4} {c['duplicates']:>3}  {c['server_cpu'] or 0:.0%}"
            )
        up = run["upload_ms"]
        _out(
            f"     upload (slot + PUT) p50 {up['p50']} ms p99 {up['p99']} ms; "
            f"uploader CPU {run['uploader_cpu']:.0%}; errors {len(run['upload_errors'])}"
        )


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--clients", type=int, default=100, help="chat clients (pairs)")
    p.add_argument("-m", "--messages", type=int, default=100, help="messages per sender")
    p.add_argument("--rate", type=float, default=500.0, help="chat msgs/s offered in total")
    p.add_argument("--uploaders", type=int, default=4, help="users uploading at once")
    p.add_argument("--size", type=float, default=5.0, help="MB per upload (default 5)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--procs", type=int, default=1, help="chat worker processes")
    p.add_argument("--db-url", help="own server on this database")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    raise_nofile_limit()
    try:
        result = measure(options)
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    for run in result["runs"]:
        for label in ("without", "with"):
            for warning in run[label]["warnings"]:
                _warn(f"{label} uploads: {warning}")
    if options.json:
        _out(json.dumps(result, indent=2))
    else:
        print_report(options, result)
    failed = any(
        run[label]["failed"] or run["upload_errors"]
        for run in result["runs"]
        for label in ("without", "with")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
