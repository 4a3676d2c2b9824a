"""natterd side by side with Prosody, ejabberd and coturn: ``make bench-compare``.

Starts a private natterd (``bench.load.LocalServer``), Prosody (``bench.prosody``) and
ejabberd (``bench.ejabberd``) on loopback ports, each with the same 10,000 users, and runs
every scenario against each of them in turn, ``--runs`` times, alternating the servers'
order from run to run so that none always goes first on a cold or warm machine. Each
scenario is the ordinary load generator in a subprocess (``python -m bench.load|bench.muc
... --host --json``), so what is compared is exactly what those tools measure, with their
exactly-once checks: a run that lost or duplicated a message is reported as failed, not
averaged in. STUN is ``bench.stun`` (natterd's STUN against coturn, which it starts itself).

The table (medians of the runs, with the ratios and the issue's targets) goes to stdout and
to ``docs/benchmarks.md`` (``--out``), with the machine, the runs and the generator's CPU.

Like for like: no server archives or stores messages offline in the runs (natterd in
``ephemeral`` mode; Prosody and ejabberd without mod_mam and offline storage), none has rate
limits or shapers, all use SCRAM-SHA-256 over TLS 1.3, direct TLS (XEP-0368).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.ejabberd import EjabberdServer
from bench.load import LocalServer, _out, raise_nofile_limit
from bench.prosody import ProsodyServer

PASSWORD = "bench-password"
PREFIX = "u"
SERVERS = ("natterd", "prosody", "ejabberd")

Pick = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure taken from a scenario's JSON."""

    key: str
    label: str
    pick: Pick
    higher_is_better: bool
    target: float | None = None  # natterd's target (issue 8)
    unit: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    module: str
    args: tuple[str, ...]
    rows: tuple[Row, ...]
    timeout: float = 900.0
    servers: tuple[str, ...] = SERVERS
    check: Callable[[dict[str, Any]], list[str]] = field(default=lambda r: [])


def _chat_problems(result: dict[str, Any]) -> list[str]:
    out = []
    if result["login"]["failed"]:
        out.append(f"{result['login']['failed']} logins failed")
    chat = result.get("chat", {})
    for key in ("lost", "duplicates", "misrouted", "bounced", "disconnects", "stream_errors"):
        if chat.get(key):
            out.append(f"{key} {chat[key]}")
    return out


def _muc_problems(result: dict[str, Any]) -> list[str]:
    out = []
    for size in result["sizes"]:
        messages = size.get("messages", {})
        for key in ("lost", "duplicates", "misrouted", "bounced", "disconnects"):
            if messages.get(key):
                out.append(f"size {size['size']}: {key} {messages[key]}")
        if size.get("failed") and not out:
            out.append(f"size {size['size']} failed")
    return out


def _muc_rate(result: dict[str, Any]) -> float | None:
    sizes = result.get("sizes") or [{}]
    rate = sizes[0].get("messages", {}).get("delivered_per_s")
    return float(rate) if rate is not None else None


SCENARIOS = (
    Scenario(
        "chat-10k",
        "bench.load",
        # First in every run, on freshly started servers, so that the RSS per session is not
        # hidden by a heap the previous scenarios grew. 1,000 logins in flight at a time:
        # enough to saturate every server, and no server fails a storm of 10,000
        # simultaneous TLS handshakes on its handshake timeout.
        ("chat", "-c", "10000", "-m", "3", "--login-timeout", "300", "--max-pending", "1000"),
        (
            Row(
                "chat_10k",
                "chat, 10,000 clients, max rate (msgs/s)",
                lambda r: r["chat"]["delivered_per_s"],
                True,
                7500,
            ),
            Row(
                "logins_10k",
                "logins/s, 10,000 sessions (SCRAM)",
                lambda r: r["login"]["rate_per_s"],
                True,
                1500,
            ),
            Row(
                "rss_session",
                "RSS per idle session (KiB)",
                lambda r: r["server"]["kib_per_session"],
                False,
                24,
            ),
        ),
        timeout=1800.0,
        check=_chat_problems,
    ),
    Scenario(
        "chat-1k",
        "bench.load",
        ("chat", "-c", "1000", "-m", "20"),
        (
            Row(
                "chat_1k",
                "chat, 1,000 clients, max rate (msgs/s)",
                lambda r: r["chat"]["delivered_per_s"],
                True,
                19000,
            ),
        ),
        check=_chat_problems,
    ),
    Scenario(
        "chat-1k-rate",
        "bench.load",
        ("chat", "-c", "1000", "-m", "5", "--rate", "1000"),
        (
            Row(
                "chat_1k_p99",
                "chat at 1,000 msgs/s offered, p99 latency (ms)",
                lambda r: r["chat"]["latency_ms"]["p99"],
                False,
                5,
            ),
        ),
        check=_chat_problems,
    ),
    Scenario(
        "muc-100",
        "bench.muc",
        ("--sizes", "100", "--deliveries", "40000"),
        (
            Row(
                "muc_100",
                "MUC, 100 occupants (deliveries/s)",
                _muc_rate,
                True,
                40000,
            ),
        ),
        check=_muc_problems,
    ),
)

# The table's order (the issue's); SCENARIOS is the order they run in.
TABLE = ("chat_1k", "chat_1k_p99", "chat_10k", "logins_10k", "rss_session", "muc_100")


def start_servers(names: list[str], users: int) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for name in names:
        server: Any
        if name == "natterd":
            settings = {"modules.mam": {"mode": "ephemeral"}}
            server = LocalServer("localhost", None, False, settings)
        elif name == "prosody":
            server = ProsodyServer("localhost", muc_settings={"muc_room_locking": False})
        else:
            server = EjabberdServer("localhost")
        t0 = time.monotonic()
        server.start(users, PREFIX, PASSWORD)
        _out(
            f"started {name} (pid {server.pid}) with {users} users in {time.monotonic() - t0:.0f} s"
        )
        servers[name] = server
    return servers


def version_of(name: str, server: Any) -> str:
    if name == "natterd":
        from importlib.metadata import version

        try:
            return version("natter")
        except Exception:  # noqa: BLE001 - not installed as a distribution
            return ""
    try:
        return str(server.version())
    except Exception:  # noqa: BLE001
        return ""


def run_scenario(scenario: Scenario, name: str, server: Any) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        scenario.module,
        *scenario.args,
        "--host",
        "127.0.0.1",
        "--port",
        str(server.tls_port),
        "--tls",
        "direct",
        "--cafile",
        server.cafile,
        "--server-pid",
        str(server.pid),
        "--user-prefix",
        PREFIX,
        "--password",
        PASSWORD,
        "--json",
    ]
    t0 = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=scenario.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {scenario.timeout:.0f} s"}
    seconds = time.monotonic() - t0
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    result["_seconds"] = seconds
    result["_problems"] = scenario.check(result)
    result["_generator_cpu"] = _generator_cpu(result)
    return result


def _generator_cpu(result: dict[str, Any]) -> float | None:
    """The busiest worker's share of a core during the measured phase."""
    shares: list[float] = []
    phases = dict(result.get("phases", {}))
    for size in result.get("sizes", []):
        phases.update({f"size-{k}": v for k, v in size.get("phases", {}).items()})
    for phase in phases.values():
        if phase and phase.get("seconds", 0) >= 1.0:
            shares += phase.get("worker_cpu", [])
    return max(shares) if shares else None


def run_stun(runs: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-m", "bench.stun", "--scenarios", "bindings", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        try:
            out.append(json.loads(done.stdout))
        except json.JSONDecodeError:
            out.append({"error": (done.stderr or done.stdout).strip()[-300:]})
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:,.1f}{unit}"


def _ratio(ours: float | None, theirs: float | None, higher: bool) -> str:
    if not ours or not theirs:
        return "-"
    return f"{(ours / theirs) if higher else (theirs / ours):.2f}x"


def build_table(
    collected: dict[str, dict[str, list[float]]],
    failures: dict[str, dict[str, list[str]]],
    stun: list[dict[str, Any]],
    names: list[str],
    versions: dict[str, str],
) -> tuple[list[str], dict[str, Any]]:
    header = ["scenario", *[f"{n} {versions.get(n, '')}".strip() for n in names]]
    header += [f"natterd / {n}" for n in names if n != "natterd"]
    header += ["natterd target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary: dict[str, Any] = {}
    rows = sorted((row for s in SCENARIOS for row in s.rows), key=lambda r: TABLE.index(r.key))
    for row in rows:
        medians = {n: median(collected.get(row.key, {}).get(n, [])) for n in names}
        ours = medians.get("natterd")
        cells = [row.label]
        for n in names:
            cell = _fmt(medians[n])
            bad = failures.get(row.key, {}).get(n)
            if bad:
                cell += f" (failed: {bad[0]})"
            cells.append(cell)
        cells += [_ratio(ours, medians[n], row.higher_is_better) for n in names if n != "natterd"]
        met = None
        if row.target is not None and ours is not None:
            met = ours >= row.target if row.higher_is_better else ours <= row.target
        cells += [
            ("≥ " if row.higher_is_better else "≤ ") + _fmt(row.target) if row.target else "-",
            "-" if met is None else ("yes" if met else "no"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        summary[row.key] = {"medians": medians, "met": met}
    natterd_stun = [
        s["servers"]["natterd"]["bindings"]["requests_per_s"]
        for s in stun
        if "servers" in s and "natterd" in s["servers"]
    ]
    coturn_stun = [
        s["servers"]["coturn"]["bindings"]["requests_per_s"]
        for s in stun
        if "servers" in s and "coturn" in s.get("servers", {})
    ]
    if natterd_stun or coturn_stun:
        ours, theirs = median(natterd_stun), median(coturn_stun)
        met = ours is not None and theirs is not None and ours >= theirs
        lines.append("")
        lines.append("| STUN | natterd | coturn | natterd / coturn | target | met |")
        lines.append("|---|---|---|---|---|---|")
        lines.append(
            f"| binding answers/s, every answer verified | {_fmt(ours)} | {_fmt(theirs)} |"
            f" {_ratio(ours, theirs, True)} | ≥ coturn | {'yes' if met else 'no'} |"
        )
        summary["stun"] = {"natterd": ours, "coturn": theirs, "met": met}
    return lines, summary


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1048576:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({model}){mem}, {platform.platform()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per scenario and server (median)")
    p.add_argument("--servers", default=",".join(SERVERS), help="natterd,prosody,ejabberd")
    p.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS) + ",stun",
        help="which scenarios (default: all)",
    )
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--out", default="docs/benchmarks.md", help="'' to write nothing")
    p.add_argument("--json", help="also write the raw results to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.servers.split(",") if n]
    wanted = set(args.scenarios.split(","))
    raise_nofile_limit()
    started = time.monotonic()
    collected: dict[str, dict[str, list[float]]] = {}
    failures: dict[str, dict[str, list[str]]] = {}
    generator: dict[str, list[float]] = {}
    raw: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    versions: dict[str, str] = {}
    try:
        servers = start_servers(names, args.users)
        versions = {n: version_of(n, s) for n, s in servers.items()}
        for run in range(args.runs):
            if run:  # every run on fresh processes (same data and ports)
                for name in names:
                    t0 = time.monotonic()
                    servers[name].restart()
                    took = time.monotonic() - t0
                    _out(f"restarted {name} (pid {servers[name].pid}) in {took:.0f} s")
            order = names[run % len(names) :] + names[: run % len(names)]
            for scenario in SCENARIOS:
                if scenario.name not in wanted:
                    continue
                for name in order:
                    result = run_scenario(scenario, name, servers[name])
                    raw.append(
                        {"run": run, "scenario": scenario.name, "name": name, "result": result}
                    )
                    problems = [result["error"]] if "error" in result else result["_problems"]
                    status = "; ".join(problems) if problems else "ok"
                    _out(
                        f"run {run + 1}/{args.runs} {scenario.name:>12} {name:>8}: {status}"
                        + (f" ({result['_seconds']:.0f} s)" if "_seconds" in result else "")
                    )
                    for row in scenario.rows:
                        if problems:
                            failures.setdefault(row.key, {}).setdefault(name, []).extend(problems)
                            continue
                        try:
                            value = row.pick(result)
                        except (KeyError, IndexError, TypeError):
                            value = None
                        if value is not None:
                            collected.setdefault(row.key, {}).setdefault(name, []).append(value)
                    if result.get("_generator_cpu") is not None:
                        generator.setdefault(scenario.name, []).append(result["_generator_cpu"])
    except RuntimeError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    finally:
        for server in servers.values():
            server.stop()
    stun = run_stun(args.runs) if "stun" in wanted else []
    lines, summary = build_table(collected, failures, stun, names, versions)
    elapsed = time.monotonic() - started
    notes = [
        f"Machine: {machine()}. Generated by `make bench-compare` (`python -m bench.compare`)"
        f" on {datetime.date.today().isoformat()} in {elapsed / 60:.1f} minutes: median of"
        f" {args.runs} runs per cell, servers alternating; every message checked to arrive"
        " exactly once (a failed run is reported, not averaged).",
        "Generator CPU (busiest worker, share of one core, max over runs): "
        + ", ".join(f"{k} {max(v):.0%}" for k, v in generator.items())
        + ". Above 85 % a worker may limit the figures.",
    ]
    for line in lines:
        _out(line)
    for note in notes:
        _out(note)
    if args.out:
        write_doc(Path(args.out), lines, notes)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": raw}, indent=2))
    return 1 if any(failures.values()) else 0


BEGIN = "<!-- bench-compare: begin -->"
END = "<!-- bench-compare: end -->"


def write_doc(path: Path, lines: list[str], notes: list[str]) -> None:
    """Replace the generated block of ``path`` (or create the file), keeping the rest."""
    block = "\n".join([BEGIN, *lines, "", *notes, END])
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
