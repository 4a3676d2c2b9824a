"""A private ejabberd for benchmark comparisons: ``EjabberdServer`` starts one with users.

Same shape as :class:`bench.prosody.ProsodyServer` (``start``/``stop``, ``port``,
``tls_port``, ``cafile``, ``pid``, ``log_tail``, ``muc_domain``, ``version``), so every
scenario runs against it unchanged::

    server = EjabberdServer("localhost")
    server.start(1000, "u", "bench-password")   # users u1..u1000
    ...
    server.stop()

Everything lives in a temporary directory: the YAML config, the Mnesia spool, the log, the
certificate and an SQLite file for the accounts. ejabberd runs as the Erlang VM directly
(``erl -s ejabberd`` with a node name of its own), not through ``ejabberdctl``, which would
switch to the ``ejabberd`` user and the system's directories. The config mirrors
``bench.load.LocalServer`` and ``ProsodyServer``: loopback ports only, no s2s, no shapers
(``c2s_shaper: none``, no ``max_fsm_queue`` limit beyond the default), SCRAM-SHA-256
(``auth_scram_hash: sha256``), no offline storage and no archive (like the Prosody config and
natterd's ephemeral mode), MUC at ``conference.<domain>``.

Users: accounts live in SQL (``auth_method: sql`` on SQLite, ejabberd's own schema from
``/usr/share/ejabberd/sql/lite.sql``), written directly with ONE set of SCRAM credentials for
all (same salt), as the other servers' bench users have: registering 10,000 users through
ejabberd would take minutes and make the client run PBKDF2 once per user.

Needs ``apt-get install ejabberd erlang-p1-sqlite3``; the system service need not run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import free_ports, raise_nofile_limit
from bench.peer import PeerProcess

SCHEMA = Path("/usr/share/ejabberd/sql/lite.sql")
ITERATIONS = 4096
SALT = b"natter-bench-salt"


def _libs() -> str | None:
    """The directory holding ``ejabberd-<version>`` (Debian keeps it outside Erlang's lib)."""
    for root in (
        Path("/usr/lib/x86_64-linux-gnu"),
        Path("/usr/lib/aarch64-linux-gnu"),
        Path("/usr/lib"),
    ):
        if any(root.glob("ejabberd-*/ebin/ejabberd.app")):
            return str(root)
    return None


def scram_row(password: str) -> tuple[str, str, str, int]:
    """(password column, serverkey, salt, iterations) of ejabberd's SQL auth for SHA-256:
    base64 keys, the stored key prefixed ``sha256:``."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return "sha256:" + b64(stored), b64(server), b64(SALT), ITERATIONS


def _yaml(value: object, indent: int = 0) -> str:
    """A small YAML writer for the config (dicts, lists, scalars)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:\n{_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{k}: {_yaml(v)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        out = []
        for item in value:
            if isinstance(item, dict):
                body = _yaml(item, indent + 2).lstrip()
                out.append(f"{pad}- {body}")
            else:
                out.append(f"{pad}- {_yaml(item)}")
        return "\n".join(out)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class EjabberdServer(PeerProcess):
    """ejabberd as a subprocess in a temporary directory, on free loopback ports."""

    name = "ejabberd"
    stop_timeout = 20.0

    def __init__(
        self,
        domain: str = "localhost",
        keep: bool = False,
        *,
        muc_domain: str | None = None,
        erl: str = "erl",
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="ejabberd-bench-")), keep)
        self.domain = domain
        self.muc_domain = muc_domain or f"conference.{domain}"
        self.erl = shutil.which(erl) or erl
        self.config_path = self.dir / "ejabberd.yml"
        self.log_path = self.dir / "ejabberd.log"
        self.db_path = self.dir / "accounts.sqlite3"
        self.port, self.tls_port = 0, 0
        self.node = f"natter_bench_{os.getpid()}"

    @property
    def cafile(self) -> str:
        return str(self.dir / f"{self.domain}.crt")

    @property
    def pid(self) -> int:
        """The Erlang VM's PID (``beam.smp``), whose RSS and CPU are ejabberd's."""
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        libs = _libs()
        if libs is None:
            return ""
        for app in Path(libs).glob("ejabberd-*/ebin/ejabberd.app"):
            m = re.search(r'\{vsn,\s*"([^"]+)"', app.read_text(errors="replace"))
            if m:
                return m.group(1)
        return ""

    def _config(self) -> dict[str, object]:
        listener = {
            "ip": "127.0.0.1",
            "module": "ejabberd_c2s",
            "shaper": "none",
            "access": "c2s",
            "max_stanza_size": 262144,
            "backlog": 4096,
        }
        return {
            "hosts": [self.domain],
            "loglevel": "warning",
            "certfiles": [str(self.dir / "cert.pem")],
            "listen": [
                {"port": self.port, "starttls_required": True, **listener},
                {"port": self.tls_port, "tls": True, **listener},
            ],
            "s2s_access": "nobody",
            "auth_method": "sql",
            "auth_password_format": "scram",
            "auth_scram_hash": "sha256",
            "sql_type": "sqlite",
            "sql_database": str(self.db_path),
            "default_db": "mnesia",
            "shaper": {},
            "shaper_rules": {"c2s_shaper": "none", "s2s_shaper": "none", "max_user_sessions": 10},
            "acl": {"local": {"user_regexp": ""}},
            "access_rules": {
                "c2s": {"allow": "all"},
                "local": {"allow": "local"},
                "nobody": {"deny": "all"},
            },
            "modules": {
                "mod_disco": {},
                "mod_roster": {},
                "mod_ping": {},
                "mod_stream_mgmt": {},
                "mod_muc": {
                    "host": self.muc_domain,
                    "access": "all",
                    "access_create": "all",
                    "access_persistent": "all",
                    "max_users": 10000,
                    "max_user_conferences": 100,
                    "history_size": 0,
                    "default_room_options": {"persistent": False},
                },
            },
        }

    def _accounts(self, users: int, prefix: str, password: str) -> None:
        if not SCHEMA.exists():
            raise RuntimeError(f"{SCHEMA} is missing (apt-get install ejabberd)")
        row = scram_row(password)
        with sqlite3.connect(self.db_path) as db:
            db.executescript(SCHEMA.read_text())
            db.executemany(
                "INSERT INTO users (username, password, serverkey, salt, iterationcount)"
                " VALUES (?, ?, ?, ?, ?)",
                ((f"{prefix}{n}", *row) for n in range(1, users + 1)),
            )

    def start(self, users: int, prefix: str, password: str) -> None:
        """Write the config, certificate and accounts, start ejabberd and wait until both c2s
        ports accept connections."""
        from xmpp_server.tls import generate_self_signed

        libs = _libs()
        if shutil.which(self.erl) is None or libs is None:
            raise RuntimeError("ejabberd is not installed (apt-get install ejabberd)")
        key = self.dir / f"{self.domain}.key"
        generate_self_signed(Path(self.cafile), key, [self.domain, self.muc_domain])
        (self.dir / "cert.pem").write_bytes(Path(self.cafile).read_bytes() + key.read_bytes())
        self.port, self.tls_port = free_ports(2)
        self.config_path.write_text(_yaml(self._config()) + "\n")
        self._accounts(users, prefix, password)
        (self.dir / "spool").mkdir()
        self.launch()

    def launch(self) -> None:
        libs = _libs()
        assert libs is not None
        raise_nofile_limit()
        env = dict(
            os.environ,
            ERL_LIBS=libs,
            EJABBERD_CONFIG_PATH=str(self.config_path),
            EJABBERD_LOG_PATH=str(self.log_path),
            ERL_MAX_PORTS="300000",
            ERL_CRASH_DUMP=str(self.dir / "erl_crash.dump"),
            HOME=str(self.dir),
        )
        spool = self.dir / "spool"
        with (self.dir / "ejabberd.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.erl,
                    "-sname",
                    self.node,
                    "-noinput",
                    "+K",
                    "true",
                    "+P",
                    "2000000",
                    "-mnesia",
                    "dir",
                    f'"{spool}"',
                    "-s",
                    "ejabberd",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
            )
        self.wait_listening([self.port, self.tls_port], 60, poll=0.2)

    def log_files(self) -> list[Path]:
        return [self.dir / "ejabberd.out", self.log_path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ejabberd", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--user-prefix", default="u")
    p.add_argument("--password", default="bench-password")
    p.add_argument("--domain", default="localhost")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    server = EjabberdServer(args.domain, args.keep)
    try:
        server.start(args.users, args.user_prefix, args.password)
        sys.stdout.write(
            f"ejabberd {server.version()} (pid {server.pid}): STARTTLS on 127.0.0.1:{server.port},"
            f" direct TLS on {server.tls_port}, CA {server.cafile}; users "
            f"{args.user_prefix}1..{args.user_prefix}{args.users}. Ctrl-C stops it.\n"
        )
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
