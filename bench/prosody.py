"""A private Prosody for benchmark comparisons: ``ProsodyServer`` starts one with users.

``python -m bench.prosody --users 1000`` starts one and prints how to reach it until Ctrl-C;
benchmarks use the class like ``bench.load.LocalServer`` (same ``start``/``stop``, ``port``,
``tls_port``, ``cafile``, ``pid``, ``log_tail``)::

    server = ProsodyServer("localhost")
    server.start(1000, "u", "bench-password")   # users u1..u1000
    ...  # STARTTLS on server.port, direct TLS on server.tls_port, MUC on server.muc_domain
    server.stop()

Everything lives in a temporary directory (config, data, log, certificate): loopback ports
only, no s2s, no HTTP, nothing of the system service's (/etc/prosody, /var/lib/prosody) is
read or written. The config mirrors what ``LocalServer`` does for natterd: no c2s rate limits
(mod_limits is not loaded), SCRAM-SHA-256 (``password_hash = "SHA-256"``), a self-signed
certificate for the domain and its MUC component, ``conference.<domain>`` with Prosody's
defaults (a new room is locked until its owner configures it). When run as root the config
says ``run_as_root = true``: Prosody otherwise refuses to start (and prosodyctl would switch
to the ``prosody`` user, who cannot read the private directory).

Users: ``prosodyctl register`` creates the first one, and its account file (salt, iteration
count, stored and server key) is copied for the others, so all share ONE set of SCRAM
credentials like natterd's bench users: registering 1000 users one prosodyctl at a time
would take a minute, copying takes milliseconds, and the client's cached salted password
saves it 10,000 PBKDF2 rounds per login. Needs the ``prosody`` package (``apt-get install
prosody``); the system service does not have to run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.load import free_ports, raise_nofile_limit
from bench.peer import PeerProcess


def _lua(value: Any) -> str:
    """A Python value as a Lua literal (config values: bool, number, string, list, dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list | tuple):
        return "{ " + "; ".join(_lua(v) for v in value) + " }"
    if isinstance(value, Mapping):
        return "{ " + "; ".join(f"[{_lua(str(k))}] = {_lua(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no Lua literal for {value!r}")


def _store_name(text: str) -> str:
    """Prosody's file name for a host or user name (util.datamanager ``encode``)."""
    return re.sub(r"[^A-Za-z0-9]", lambda m: f"%{ord(m.group(0)):02x}", text)


class ProsodyServer(PeerProcess):
    """Prosody as a subprocess in a temporary directory, on free loopback ports.

    ``settings`` adds or overrides global options (``{"c2s_stanza_size_limit": 1 << 20}``),
    ``host_settings`` options of the VirtualHost, ``muc_settings`` of the MUC component
    (``{"muc_room_locking": False}``); values are Python values written as Lua literals.
    """

    name = "prosody"

    def __init__(
        self,
        domain: str = "localhost",
        keep: bool = False,
        *,
        muc_domain: str | None = None,
        settings: Mapping[str, Any] | None = None,
        host_settings: Mapping[str, Any] | None = None,
        muc_settings: Mapping[str, Any] | None = None,
        log_level: str = "info",
        prosody: str = "prosody",
        prosodyctl: str = "prosodyctl",
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="prosody-bench-")), keep)
        self.domain = domain
        self.muc_domain = muc_domain or f"conference.{domain}"
        self.settings = dict(settings or {})
        self.host_settings = dict(host_settings or {})
        self.muc_settings = dict(muc_settings or {})
        self.log_level = log_level
        self.prosody = shutil.which(prosody) or prosody
        self.prosodyctl = shutil.which(prosodyctl) or prosodyctl
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self.port, self.tls_port = 0, 0

    @property
    def cafile(self) -> str:
        return str(self.dir / f"{self.domain}.crt")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        """Prosody's version, e.g. ``0.12.3``; empty if prosodyctl does not say."""
        try:
            out = subprocess.run(
                [self.prosodyctl, "--config", str(self.config_path), "about"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
        m = re.search(r"Prosody (\S+)", out)
        return m.group(1) if m else ""

    def _config(self) -> str:
        cert = {"certificate": self.cafile, "key": str(self.dir / f"{self.domain}.key")}
        options: dict[str, Any] = {
            "pidfile": str(self.dir / "prosody.pid"),
            "data_path": str(self.data_dir),
            "certificates": str(self.dir),
            "log": [
                {"levels": {"min": self.log_level}, "to": "file", "filename": str(self.log_path)}
            ],
            "interfaces": ["127.0.0.1"],
            "c2s_ports": [self.port],
            "c2s_interfaces": ["127.0.0.1"],
            "c2s_direct_tls_ports": [self.tls_port],
            "c2s_direct_tls_interfaces": ["127.0.0.1"],
            "s2s_ports": [],
            "component_ports": [],
            "legacy_ssl_ports": [],
            "http_ports": [],
            "https_ports": [],
            # No s2s, no offline storage; mod_limits (c2s rate limits) is simply not loaded.
            "modules_disabled": ["s2s", "s2s_auth_certs", "offline"],
            "modules_enabled": ["roster", "saslauth", "tls", "disco", "ping", "posix"],
            "authentication": "internal_hashed",
            "password_hash": "SHA-256",  # SCRAM-SHA-256 (0.12 offers one SCRAM hash)
            "c2s_require_encryption": True,
            "storage": "internal",
            "network_settings": {"tcp_backlog": 1024},
        }
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            options["run_as_root"] = True
        options.update(self.settings)
        lines = [f"{key} = {_lua(value)}" for key, value in options.items()]
        lines.append(f"VirtualHost {_lua(self.domain)}")
        for key, value in {"ssl": cert, **self.host_settings}.items():
            lines.append(f"    {key} = {_lua(value)}")
        lines.append(f'Component {_lua(self.muc_domain)} "muc"')
        for key, value in {"ssl": cert, **self.muc_settings}.items():
            lines.append(f"    {key} = {_lua(value)}")
        return "\n".join(lines) + "\n"

    def start(self, users: int, prefix: str, password: str) -> None:
        """Write the config and certificate, create users PREFIX1..PREFIXN, start Prosody and
        wait until both c2s ports accept connections."""
        from xmpp_server.tls import generate_self_signed

        if shutil.which(self.prosody) is None or shutil.which(self.prosodyctl) is None:
            raise RuntimeError("prosody is not installed (apt-get install prosody)")
        self.data_dir.mkdir()
        generate_self_signed(
            Path(self.cafile), self.dir / f"{self.domain}.key", [self.domain, self.muc_domain]
        )
        self.port, self.tls_port = free_ports(2)
        self.config_path.write_text(self._config())
        if users:
            self.register(users, prefix, password)
        self.launch()

    def launch(self) -> None:
        raise_nofile_limit()  # inherited: a thousand clients need more than 1024 descriptors
        with (self.dir / "prosody.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [self.prosody, "--config", str(self.config_path), "-F"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_listening([self.port, self.tls_port], 30)

    def register(self, users: int, prefix: str, password: str) -> None:
        """Create PREFIX1..PREFIXN: prosodyctl makes the first, the rest are its copies."""
        first = f"{prefix}1"
        done = subprocess.run(
            [self.prosodyctl, "--config", str(self.config_path), "register"]
            + [first, self.domain, password],
            capture_output=True,
            text=True,
            timeout=60,
        )
        accounts = self.data_dir / _store_name(self.domain) / "accounts"
        template = accounts / f"{_store_name(first.lower())}.dat"
        if done.returncode != 0 or not template.is_file():
            raise RuntimeError(
                f"prosodyctl register failed ({done.returncode}): {done.stdout}{done.stderr}"
            )
        data = template.read_bytes()
        for i in range(2, users + 1):
            (accounts / f"{_store_name(f'{prefix}{i}'.lower())}.dat").write_bytes(data)

    def log_files(self) -> list[Path]:
        return [self.dir / "prosody.out", self.log_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.prosody",
        description="Start a private Prosody with users PREFIX1..PREFIXN until Ctrl-C.",
    )
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--user-prefix", default="u")
    parser.add_argument("--password", default="bench-password")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = ProsodyServer(args.domain, args.keep)
    try:
        server.start(args.users, args.user_prefix, args.password)
        sys.stdout.write(
            f"prosody {server.version()} (pid {server.pid}) for {args.domain}, MUC "
            f"{server.muc_domain}: STARTTLS on 127.0.0.1:{server.port}, direct TLS on "
            f"127.0.0.1:{server.tls_port}\nusers {args.user_prefix}1..{args.user_prefix}"
            f"{args.users}, password {args.password!r}, CA file {server.cafile}\n"
            f"directory {server.dir}; Ctrl-C stops it\n"
        )
        sys.stdout.flush()
        assert server.proc is not None
        server.proc.wait()
        sys.stderr.write(f"prosody exited with {server.proc.returncode}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
