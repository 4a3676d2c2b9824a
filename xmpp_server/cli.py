"""The ``natterd`` and ``natterctl`` command lines.

Both are ``f(argv) -> int`` so tests call them directly. Exit codes: 0 ok, 1 the operation
failed (already exists, not found), 2 usage, configuration or input error, 3 the database
schema is not migrated.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import ipaddress
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from xmpp_server import __version__
from xmpp_server.config import Config, ConfigError, load_config
from xmpp_server.credentials import ScramCredentials
from xmpp_server.jid import JID

if TYPE_CHECKING:
    from voip.console import CallReport, PhoneOptions
    from xmpp_server.blobs import BlobStore
    from xmpp_server.modules.muc import MucOptions
    from xmpp_server.storage import Storage

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3


class CommandFailed(Exception):
    """Ends a command with a message on stderr and the given exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(prog: str, text: str) -> None:
    sys.stderr.write(f"{prog}: {text}\n")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """argparse exits on --help and on errors; turn that into a return code."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def _config_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Sub-parsers repeat --config so it works after the command too; SUPPRESS keeps them
    # from resetting a value given before the command.
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None if top else argparse.SUPPRESS,
        help="configuration file (default: $NATTERD_CONFIG, then /etc/natterd/natterd.toml)",
    )


# ---------------------------------------------------------------------------------------------
# natterd


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: Config) -> None:
    """Route logging to stderr at the configured level and format."""
    handler = logging.StreamHandler()
    if config.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.logging.level.upper(), handlers=[handler], force=True)
    if config.logging.level != "debug":
        # Alembic announces each of its plugins at INFO whenever the schema revision is read.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """``natterd [--config FILE] [run | stun | push]``: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="natterd", description="Natter XMPP server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _config_option(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _config_option(commands.add_parser("run", help="serve clients (the default)"), top=False)
    _config_option(
        commands.add_parser("stun", help="run only the STUN/TURN server ([stun] section)"),
        top=False,
    )
    _config_option(
        commands.add_parser(
            "push", help="run the XEP-0357 push app server, a component ([pushgate] section)"
        ),
        top=False,
    )
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _serve(args.config, args.command or "run")


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when configured and installed, else the standard library's."""
    if kind != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("natterd").warning("uvloop is not installed: the asyncio loop runs")
        return None
    logging.getLogger("natterd").debug("event loop: uvloop")
    return uvloop.new_event_loop


def _serve(config_path: str | None, what: str) -> int:
    """Load the config and run one of natterd's services until a signal stops it:
    ``run`` (the XMPP server), ``stun`` (the STUN/TURN server alone, whatever ``[stun]
    enabled`` says) or ``push`` (the XEP-0357 app server, a component of natterd)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _err("natterd", str(exc))
        return EXIT_USAGE
    configure_logging(config)
    # Imported here so natterctl and check-config never pay for the whole server.
    from xmpp_server.storage import NotMigrated

    if what == "stun":
        from stun.service import serve
    elif what == "push":
        from xmpp_server.pushgate import serve
    else:
        from xmpp_server.server import serve
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
            runner.run(serve(config))
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as exc:
        _err("natterd", str(config.explain(exc)))
        return EXIT_USAGE
    except NotMigrated as exc:
        _err("natterd", str(exc))
        return EXIT_NOT_MIGRATED
    except OSError as exc:  # typically: address already in use
        label = {"stun": "STUN", "push": "the push app server"}.get(what, "")
        _err("natterd", f"cannot serve{' ' + label if label else ''}: {exc}")
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# natterctl

Handler = Callable[[argparse.Namespace, Config], int]


def _ctl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natterctl", description="Natter administration")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _config_option(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        _config_option(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    user = commands.add_parser("user", help="manage accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    cmd = command(user, "add", _user_add, "create an account")
    cmd.add_argument("jid")
    cmd.add_argument("--password-file", metavar="FILE", help="read the password's first line")
    cmd = command(user, "passwd", _user_passwd, "set an account's password")
    cmd.add_argument("jid")
    cmd.add_argument("--password-file", metavar="FILE", help="read the password's first line")
    command(user, "delete", _user_delete, "delete an account and its data").add_argument("jid")
    cmd = command(user, "list", _user_list, "list accounts")
    cmd.add_argument("--domain", help="list this domain (default: the configured domain)")
    command(user, "show", _user_show, "show an account").add_argument("jid")
    cmd = command(user, "unlock", _user_unlock, "forgive an account's failed logins")
    cmd.add_argument("jid")
    cmd.add_argument("--address", metavar="A", help="only those from this IP address")

    db = commands.add_parser("db", help="manage the database schema").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    command(db, "upgrade", _db_upgrade, "migrate the database to the current schema")
    command(db, "status", _db_status, "show the schema revision (exit 3 when behind)")

    cert = commands.add_parser("cert", help="manage the TLS certificate").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    cmd = command(cert, "generate", _cert_generate, "write a self-signed certificate")
    existing = cmd.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true", help="replace existing files")
    existing.add_argument(
        "--if-missing", action="store_true", help="do nothing (and succeed) if both files exist"
    )

    archive = commands.add_parser("archive", help="manage message archives").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    cmd = command(archive, "purge", _archive_purge, "delete old archived messages")
    cmd.add_argument(
        "--older-than",
        type=int,
        metavar="DAYS",
        help="age in days (default: modules.mam.retention_days)",
    )
    cmd.add_argument("--user", metavar="JID", help="only this account's archive")

    uploads = commands.add_parser("uploads", help="manage uploaded files").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    cmd = command(uploads, "purge", _uploads_purge, "delete old uploaded files and unused slots")
    cmd.add_argument(
        "--older-than",
        type=int,
        metavar="DAYS",
        help="age in days (default: modules.upload.expire_days)",
    )

    stickers = commands.add_parser(
        "stickers", help="manage the server's sticker packs (XEP-0449)"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    cmd = command(
        stickers, "import", _stickers_import, "publish a directory of images as a server pack"
    )
    cmd.add_argument("directory", metavar="DIR", help="the images (png, webp, gif, ...)")
    cmd.add_argument("--name", required=True, help="the pack's name")
    cmd.add_argument("--summary", help="a description, copyright or licence")
    command(stickers, "list", _stickers_list, "list the server's sticker packs")
    cmd = command(stickers, "remove", _stickers_remove, "remove a server pack and its files")
    cmd.add_argument("pack", metavar="PACK_ID", help="as `stickers list` shows it")

    room = commands.add_parser(
        "room", help="manage group chat rooms (applied live when natterd runs)"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    room_help = (
        "NAME or NAME@SERVICE (the MUC service: modules.muc.host, default conference.DOMAIN)"
    )
    cmd = command(room, "create", _room_create, "create a persistent room")
    cmd.add_argument("room", metavar="ROOM", help=room_help)
    cmd.add_argument(
        "--owner",
        metavar="JID",
        action="append",
        default=[],
        dest="owners",
        help="an owner's bare JID (repeatable; default: none, natterctl and modules.muc.admins"
        " manage the room)",
    )
    cmd.add_argument("--name", help="the room's display name")
    cmd.add_argument(
        "--members-only",
        action="store_const",
        const=True,
        help="admit members only (default: modules.muc.default_members_only)",
    )
    cmd.add_argument(
        "--private",
        "--hidden",
        dest="public",
        action="store_const",
        const=False,
        help="not listed in the service's disco#items (default: modules.muc.default_public)",
    )
    cmd.add_argument(
        "--password-file", metavar="FILE", help="room password from a file's first line; - stdin"
    )
    cmd.add_argument(
        "--max-occupants", metavar="N", type=int, help="up to modules.muc.max_occupants"
    )
    cmd.add_argument(
        "--whois",
        choices=("anyone", "moderators"),
        help="who sees occupants' real JIDs (default: modules.muc.default_whois)",
    )
    command(room, "list", _room_list, "list rooms")
    cmd = command(room, "show", _room_show, "show a room's configuration and state")
    cmd.add_argument("room", metavar="ROOM", help=room_help)
    cmd = command(room, "delete", _room_delete, "delete a room; its occupants are told")
    cmd.add_argument("room", metavar="ROOM", help=room_help)
    cmd.add_argument("--reason", metavar="TEXT", help="told to the occupants")
    cmd = command(room, "members", _room_members, "list a room's affiliations")
    cmd.add_argument("room", metavar="ROOM", help=room_help)
    cmd.add_argument("--affiliation", choices=("owner", "admin", "member", "outcast"))
    cmd = command(room, "affiliate", _room_affiliate, "set a JID's affiliation with a room")
    cmd.add_argument("room", metavar="ROOM", help=room_help)
    cmd.add_argument("jid", metavar="JID", help="a user's bare JID")
    cmd.add_argument(
        "affiliation",
        metavar="AFFILIATION",
        choices=("owner", "admin", "member", "outcast", "none"),
        help="owner, admin, member, outcast (banned) or none (removes it)",
    )
    cmd.add_argument("--reason", metavar="TEXT", help="kept with the affiliation")

    command(commands, "check-config", _check_config, "validate the configuration")
    command(commands, "stats", _stats, "a running natterd's counters, as JSON")

    cmd = command(
        commands, "announce", _announce, "send a message to the users of a running natterd"
    )
    target = cmd.add_mutually_exclusive_group()
    target.add_argument(
        "--online",
        dest="target",
        action="store_const",
        const="online",
        help="to every online session (the default)",
    )
    target.add_argument(
        "--all",
        dest="target",
        action="store_const",
        const="all",
        help="also store it for offline accounts, who get it when they next log in",
    )
    cmd.set_defaults(target="online")
    cmd.add_argument("--subject", help="the message's subject")
    cmd.add_argument("body", metavar="BODY", help="the message text; - reads it from stdin")

    cmd = command(commands, "call", _call, "call a JID (XEP-0353 + Jingle RTP) and report")
    cmd.add_argument("peer", metavar="JID", help="whom to call (bare: rings all devices)")
    _phone_options(cmd, duration=10.0)
    cmd = command(commands, "answer", _answer, "wait for one call, answer it and report")
    _phone_options(cmd, duration=None)
    return parser


def _phone_options(cmd: argparse.ArgumentParser, *, duration: float | None) -> None:
    cmd.add_argument("--as", dest="account", metavar="JID", required=True, help="log in as")
    cmd.add_argument(
        "--password-file", metavar="FILE", help="read the password's first line; - stdin"
    )
    source = cmd.add_mutually_exclusive_group()
    source.add_argument("--tone", metavar="HZ", type=float, help="send a sine tone (default 440)")
    source.add_argument("--play", metavar="FILE", help="send this audio file")
    cmd.add_argument("--record", metavar="FILE", help="write what is heard to a WAV file")
    cmd.add_argument(
        "--duration",
        metavar="S",
        type=float,
        default=duration,
        help="hang up after S connected seconds"
        + (f" (default {duration:g})" if duration else " (default: when the peer does)"),
    )
    cmd.add_argument(
        "--timeout", metavar="S", type=float, default=30.0, help="signalling timeout (default 30)"
    )


def _phone(args: argparse.Namespace, config: Config) -> PhoneOptions:
    from pathlib import Path

    from voip.console import PhoneOptions

    host = next((h for h in config.c2s.host if h not in ("0.0.0.0", "::")), "127.0.0.1")
    return PhoneOptions(
        account=_account(args.account, config),
        password=_login_password(args.password_file),
        host=host,
        port=config.c2s.port,
        cafile=config.cert_path if config.cert_path.exists() else None,
        tone=args.tone,
        play=Path(args.play) if args.play else None,
        record=Path(args.record) if args.record else None,
        duration=args.duration,
        timeout=args.timeout,
    )


def _login_password(source: str | None) -> str:
    if source is not None:
        return _read_password(source)
    try:
        password = getpass.getpass("Password: ")
    except EOFError:
        _fail(EXIT_USAGE, "no password given")
    if not password:
        _fail(EXIT_USAGE, "empty password")
    return password


def _report(report: CallReport) -> int:
    frequency = f"{report.frequency:.1f} Hz" if report.frequency is not None else "nothing"
    _out(
        f"call with {report.peer}: heard {report.seconds_heard:.1f} s, dominant {frequency};"
        f" ended: {report.reason}"
        + (f"; ice: {report.ice[0]} -> {report.ice[1]}" if report.ice else "")
        + (f"; rtcp rtt: {report.rtcp_rtt * 1000:.0f} ms" if report.rtcp_rtt is not None else "")
    )
    return EXIT_OK


def _call(args: argparse.Namespace, config: Config) -> int:
    from voip.console import place_call
    from voip.softphone import CallError

    options = _phone(args, config)
    try:
        return _report(asyncio.run(place_call(args.peer, options)))
    except CallError as exc:
        _fail(EXIT_FAILED, str(exc))


def _answer(args: argparse.Namespace, config: Config) -> int:
    from voip.console import answer_call
    from voip.softphone import CallError

    options = _phone(args, config)
    try:
        return _report(asyncio.run(answer_call(options)))
    except CallError as exc:
        _fail(EXIT_FAILED, str(exc))


def ctl_main(argv: list[str] | None = None) -> int:
    """``natterctl [--config FILE] COMMAND ...``: administration without a running server."""
    args = _parse(_ctl_parser(), argv)
    if isinstance(args, int):
        return args
    from xmpp_server.storage import NotMigrated

    handler: Handler = args.handler
    try:
        config = load_config(args.config)
        return handler(args, config)
    except CommandFailed as exc:
        _err("natterctl", str(exc))
        return exc.code
    except ConfigError as exc:
        _err("natterctl", str(exc))
        return EXIT_USAGE
    except NotMigrated as exc:
        _err("natterctl", str(exc))
        return EXIT_NOT_MIGRATED


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """Report an unreachable or failing database by its URL (password hidden), exit 1."""
    from xmpp_server.storage.db import hide_password

    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        # The driver's own sentence, without SQLAlchemy's wrapper and background link.
        reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        _fail(EXIT_FAILED, f"database {hide_password(url)}: {reason}")


def _fail(code: int, message: str) -> NoReturn:
    raise CommandFailed(code, message)


@asynccontextmanager
async def _storage(config: Config) -> AsyncIterator[Storage]:
    from xmpp_server.storage import Storage

    with _database_errors(config.storage.url):
        storage = await Storage.open(config.storage.url)
        try:
            yield storage
        finally:
            await storage.close()


def _account(text: str, config: Config) -> str:
    """Normalise a bare JID of the served domain, or end the command with exit 2."""
    try:
        jid = JID.parse(text)
    except ValueError as exc:
        _fail(EXIT_USAGE, f"invalid JID {text!r}: {exc}")
    if jid.local is None or jid.resource is not None:
        _fail(EXIT_USAGE, f"invalid JID {text!r}: expected a bare JID like alice@{config.domain}")
    if jid.domain != config.domain:
        _fail(EXIT_USAGE, f"unknown domain {jid.domain!r} (this server serves: {config.domain})")
    return str(jid)


def _read_password(source: str | None) -> str:
    """From a file's first line, stdin (``-``) or a twice-typed prompt; never from argv."""
    if source is None:
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Repeat password: ") != password:
                _fail(EXIT_USAGE, "passwords do not match")
        except EOFError:
            _fail(EXIT_USAGE, "no password given")
    elif source == "-":
        password = sys.stdin.readline()
    else:
        try:
            with open(source, encoding="utf-8") as fh:
                password = fh.readline()
        except OSError as exc:
            _fail(EXIT_USAGE, f"cannot read password file {source}: {exc.strerror}")
        except UnicodeDecodeError:
            _fail(EXIT_USAGE, f"password file {source} is not UTF-8 text")
    password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        _fail(EXIT_USAGE, "empty password")
    return password


def _credentials(source: str | None, config: Config) -> list[ScramCredentials]:
    from xmpp_server.sasl import make_credentials

    password = _read_password(source)
    try:
        return make_credentials(password, config.auth.scram_iterations)
    except ValueError as exc:
        _fail(EXIT_USAGE, f"invalid password: {exc}")


def _user_add(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.storage import AccountExists

    user = _account(args.jid, config)

    async def add() -> int:
        async with _storage(config) as storage:
            # Checked before prompting so nobody types a password for nothing.
            if await storage.accounts.exists(user):
                _fail(EXIT_FAILED, f"user {user} already exists")
            credentials = _credentials(args.password_file, config)
            try:
                await storage.accounts.create(user, credentials)
            except AccountExists:
                _fail(EXIT_FAILED, f"user {user} already exists")
        _out(f"created user {user}")
        return EXIT_OK

    return asyncio.run(add())


def _user_passwd(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.storage import AccountNotFound

    user = _account(args.jid, config)

    async def passwd() -> int:
        async with _storage(config) as storage:
            if not await storage.accounts.exists(user):
                _fail(EXIT_FAILED, f"no such user {user}")
            credentials = _credentials(args.password_file, config)
            try:
                await storage.accounts.set_credentials(user, credentials)
            except AccountNotFound:
                _fail(EXIT_FAILED, f"no such user {user}")
        _out(f"password changed for {user}")
        return EXIT_OK

    return asyncio.run(passwd())


def _user_delete(args: argparse.Namespace, config: Config) -> int:
    user = _account(args.jid, config)

    async def delete() -> int:
        async with _storage(config) as storage:
            if not await storage.accounts.delete(user):
                _fail(EXIT_FAILED, f"no such user {user}")
        _out(f"deleted user {user}")
        return EXIT_OK

    return asyncio.run(delete())


def _user_list(args: argparse.Namespace, config: Config) -> int:
    domain = config.domain
    if args.domain is not None:
        try:
            jid = JID.parse(args.domain)
        except ValueError as exc:
            _fail(EXIT_USAGE, f"invalid domain {args.domain!r}: {exc}")
        if not jid.is_domain:
            _fail(EXIT_USAGE, f"invalid domain {args.domain!r}: expected a domain name")
        domain = jid.domain

    async def list_users() -> int:
        async with _storage(config) as storage:
            users = await storage.accounts.list(domain)
        for user in sorted(users):
            _out(user)
        return EXIT_OK

    return asyncio.run(list_users())


def _user_show(args: argparse.Namespace, config: Config) -> int:
    user = _account(args.jid, config)

    async def show() -> int:
        async with _storage(config) as storage:
            info = await storage.accounts.info(user)
        if info is None:
            _fail(EXIT_FAILED, f"no such user {user}")
        _out(f"user: {info.user}")
        _out(f"created_at: {info.created_at.isoformat()}")
        _out(f"mechanisms: {', '.join(info.mechanisms) or '(none)'}")
        return EXIT_OK

    return asyncio.run(show())


def _db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.storage.migrations import current_revision, upgrade

    async def run() -> int:
        with _database_errors(config.storage.url):
            await upgrade(config.storage.url)
            revision = await current_revision(config.storage.url)
        _out(f"database is at schema revision {revision}")
        return EXIT_OK

    return asyncio.run(run())


def _db_status(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.storage.db import hide_password
    from xmpp_server.storage.migrations import current_revision, head_revision

    async def run() -> int:
        with _database_errors(config.storage.url):
            current = await current_revision(config.storage.url)
        head = head_revision()
        _out(f"database: {hide_password(config.storage.url)}")
        _out(f"current:  {current if current is not None else 'none (empty database)'}")
        _out(f"head:     {head}")
        if current == head:
            _out("status:   up to date")
            return EXIT_OK
        _out("status:   behind; run: natterctl db upgrade")
        return EXIT_NOT_MIGRATED

    return asyncio.run(run())


def _cert_generate(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.tls import generate_self_signed

    cert_path, key_path = config.default_tls_paths()
    existing = [str(p) for p in (cert_path, key_path) if p.exists()]
    if args.if_missing and len(existing) == 2:
        _out(f"certificate exists: {cert_path}")
        return EXIT_OK
    if existing and not (args.force or args.if_missing):
        _fail(EXIT_FAILED, f"{' and '.join(existing)} already exist(s); use --force to replace")
    try:
        generate_self_signed(cert_path, key_path, [config.domain])
    except OSError as exc:
        _fail(EXIT_FAILED, f"cannot write the certificate: {exc}")
    _out(f"wrote a self-signed certificate for {config.domain}: {cert_path}, key {key_path}")
    if config.tls_configured:
        _err("natterctl", f"note: tls.cert_file is set, so the server uses {config.cert_path}")
    return EXIT_OK


def _archive_purge(args: argparse.Namespace, config: Config) -> int:
    from datetime import UTC, datetime, timedelta

    from xmpp_server.config import parse_options
    from xmpp_server.modules.mam import MamOptions

    user = _account(args.user, config) if args.user is not None else None
    days: int | None = args.older_than
    if days is None:
        raw = dict(config.modules.get("mam", {}))
        raw.pop("enabled", None)
        try:
            days = parse_options(MamOptions, raw, "modules.mam").retention_days
        except ConfigError as exc:
            raise config.explain(exc) from None
        if days == 0:
            _out("archives are kept forever (modules.mam.retention_days = 0); nothing purged")
            return EXIT_OK
    elif days < 0:
        _fail(EXIT_USAGE, f"--older-than must be 0 or more days, got {days}")
    cutoff = datetime.now(UTC) - timedelta(days=days)

    async def purge() -> int:
        async with _storage(config) as storage:
            purged = await storage.archive.purge(user, older_than=cutoff)
        whose = f" of {user}" if user else ""
        _out(f"purged {purged} archived messages{whose} older than {days} days")
        return EXIT_OK

    return asyncio.run(purge())


def _uploads_purge(args: argparse.Namespace, config: Config) -> int:
    from datetime import UTC, datetime, timedelta

    from xmpp_server.blobs import BlobError
    from xmpp_server.config import parse_options
    from xmpp_server.modules.upload import UploadOptions, open_blobs, purge

    raw = dict(config.modules.get("upload", {}))
    raw.pop("enabled", None)
    try:
        options = parse_options(UploadOptions, raw, "modules.upload")
    except ConfigError as exc:
        raise config.explain(exc) from None
    days: int | None = args.older_than
    if days is None:
        days = options.expire_days
    elif days < 0:
        _fail(EXIT_USAGE, f"--older-than must be 0 or more days, got {days}")
    cutoff = datetime.now(UTC) - timedelta(days=days) if days else None
    if args.older_than == 0:
        cutoff = datetime.now(UTC)

    async def run() -> int:
        blobs = open_blobs(config, options)
        try:
            async with _storage(config) as storage:
                purged = await purge(storage, blobs, cutoff, options.slot_ttl)
        except BlobError as exc:
            _fail(EXIT_FAILED, f"blob storage: {exc}")
        finally:
            await blobs.close()
        if cutoff is None:
            _out(f"purged {purged} unused upload slots (files are kept: expire_days = 0)")
        else:
            _out(f"purged {purged} uploads older than {days} days")
        return EXIT_OK

    return asyncio.run(run())


def _sticker_blobs(config: Config) -> BlobStore:
    """The upload module's blob store: server packs keep their files where uploads do."""
    from xmpp_server.config import parse_options
    from xmpp_server.modules.upload import UploadOptions, open_blobs

    raw = dict(config.modules.get("upload", {}))
    raw.pop("enabled", None)
    try:
        return open_blobs(config, parse_options(UploadOptions, raw, "modules.upload"))
    except ConfigError as exc:
        raise config.explain(exc) from None


def _stickers_import(args: argparse.Namespace, config: Config) -> int:
    from pathlib import Path

    from xmpp_server.blobs import BlobError
    from xmpp_server.modules.stickers import import_pack

    directory = Path(args.directory)
    if not directory.is_dir():
        _fail(EXIT_USAGE, f"not a directory: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file())

    async def run() -> int:
        blobs = _sticker_blobs(config)
        try:
            async with _storage(config) as storage:
                pack, count = await import_pack(
                    storage,
                    blobs,
                    config.domain,
                    config.http_public_url,
                    files,
                    args.name,
                    args.summary,
                )
        except ValueError as exc:
            _fail(EXIT_USAGE, f"{directory}: {exc}")
        except (BlobError, OSError) as exc:
            _fail(EXIT_FAILED, f"cannot store the stickers: {exc}")
        finally:
            await blobs.close()
        _out(f"published pack {pack} ({count} stickers) on {config.domain}")
        return EXIT_OK

    return asyncio.run(run())


def _stickers_list(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.modules.stickers import NS_STICKERS, server_packs
    from xmpp_server.stanza import qn

    async def run() -> int:
        async with _storage(config) as storage:
            packs = await server_packs(storage, config.domain)
        for pack_id, pack in packs:
            if pack is None:
                _out(f"{pack_id}\t(damaged)")
                continue
            name = pack.findtext(qn(NS_STICKERS, "name"), "")
            count = len(pack.findall(qn(NS_STICKERS, "item")))
            _out(f"{pack_id}\t{count} stickers\t{name}")
        return EXIT_OK

    return asyncio.run(run())


def _stickers_remove(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.blobs import BlobError
    from xmpp_server.modules.stickers import remove_pack

    async def run() -> int:
        blobs = _sticker_blobs(config)
        try:
            async with _storage(config) as storage:
                removed = await remove_pack(
                    storage, blobs, config.domain, config.http_public_url, args.pack
                )
        except BlobError as exc:
            _fail(EXIT_FAILED, f"blob storage: {exc}")
        finally:
            await blobs.close()
        if not removed:
            _fail(EXIT_FAILED, f"no such pack: {args.pack}")
        _out(f"removed pack {args.pack}")
        return EXIT_OK

    return asyncio.run(run())


def _validate_modules(config: Config) -> None:
    """Use the module registry's validator when it exists (it is optional for this command)."""
    try:
        modules = importlib.import_module("xmpp_server.modules")
    except ModuleNotFoundError as exc:
        if exc.name != "xmpp_server.modules":
            raise
        return
    validate = getattr(modules, "validate_module_options", None)
    if validate is not None:
        try:
            validate(config)
        except ConfigError as exc:
            raise config.explain(exc) from None


def _check_config(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server.storage.db import hide_password

    _validate_modules(config)
    c2s = config.c2s
    hosts = ", ".join(c2s.host)
    listen = f"{hosts} port {c2s.port} (STARTTLS {'required' if c2s.require_tls else 'optional'})"
    if c2s.direct_tls:
        listen += f", direct TLS port {c2s.direct_tls_port}"
    cert = str(config.cert_path)
    if not config.tls_configured:
        cert += " (generated on first start if missing)"
    _out(f"configuration OK: {config.path if config.path else '(no file: defaults)'}")
    for name, var in sorted(config.env_keys.items()):
        _out(f"  override:  {name} from {var}")
    _out(f"  domain:    {config.domain}")
    _out(f"  data_dir:  {config.data_dir}")
    _out(f"  storage:   {hide_password(config.storage.url)}")
    _out(f"  c2s:       {listen}")
    _out(f"  tls:       {cert}, TLS >= {config.tls.min_version}")
    _out(f"  auth:      {', '.join(config.auth.mechanisms)}")
    _out(f"  modules:   {', '.join(sorted(config.modules)) or '(none configured)'}")
    _out(f"  logging:   {config.logging.level}, {config.logging.format}")
    return EXIT_OK


def _stats(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server import control

    path = control.socket_path(config)
    try:
        answer = asyncio.run(control.request(path, {"command": "stats"}, timeout=30))
    except control.NotRunning as exc:
        _fail(EXIT_FAILED, str(exc))
    except (OSError, ValueError) as exc:
        _fail(EXIT_FAILED, f"control socket {path}: {exc}")
    if not isinstance(answer, dict) or not answer.get("ok"):
        _fail(EXIT_FAILED, f"natterd refused: {answer!r}")
    _out(json.dumps(answer["stats"], indent=2, sort_keys=True))
    return EXIT_OK


def _user_unlock(args: argparse.Namespace, config: Config) -> int:
    """Lockouts live in the running natterd's memory, so this asks it over the socket."""
    from xmpp_server import control

    user = _account(args.jid, config)
    message: dict[str, Any] = {"command": "user.unlock", "jid": user}
    if args.address:
        try:
            message["address"] = str(ipaddress.ip_address(args.address))
        except ValueError:
            _fail(EXIT_USAGE, f"not an IP address: {args.address}")
    path = control.socket_path(config)
    try:
        answer = asyncio.run(control.request(path, message, timeout=30))
    except control.NotRunning as exc:
        _fail(EXIT_FAILED, str(exc))
    except (OSError, ValueError) as exc:
        _fail(EXIT_FAILED, f"control socket {path}: {exc}")
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        _fail(EXIT_FAILED, f"natterd refused: {error or repr(answer)}")
    where = f" from {message['address']}" if args.address else ""
    _out(f"unlocked {user}{where}")
    return EXIT_OK


def _announce(args: argparse.Namespace, config: Config) -> int:
    from xmpp_server import control

    body: str = sys.stdin.read() if args.body == "-" else args.body
    if not body.strip():
        _fail(EXIT_USAGE, "empty announcement")
    path = control.socket_path(config)
    message = {"command": "announce", "target": args.target, "body": body}
    if args.subject:
        message["subject"] = args.subject
    try:
        answer = asyncio.run(control.request(path, message))
    except control.NotRunning as exc:
        _fail(EXIT_FAILED, str(exc))
    except (OSError, ValueError) as exc:  # permission denied, timeout, garbled answer
        _fail(EXIT_FAILED, f"control socket {path}: {exc}")
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        _fail(EXIT_FAILED, f"natterd refused the announcement: {error or repr(answer)}")
    text = f"announcement delivered to {answer['delivered']} online session(s)"
    if args.target == "all":
        text += f", stored for {answer['stored']} offline account(s)"
    _out(text)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# natterctl room: through the control socket when natterd runs, so occupants see the change at
# once; on the database otherwise. The same commands (muc/admin.py) answer either way.


def _muc_options(config: Config) -> MucOptions:
    from xmpp_server.config import parse_options
    from xmpp_server.modules.muc import MucOptions

    raw = dict(config.modules.get("muc", {}))
    enabled = raw.pop("enabled", True)
    if not isinstance(enabled, bool):
        error = ConfigError(f"expected true or false, got {enabled!r}", "modules.muc.enabled")
        raise config.explain(error)
    if not enabled:
        _fail(EXIT_USAGE, "the muc module is off ([modules.muc] enabled = false)")
    try:
        return parse_options(MucOptions, raw, "modules.muc")
    except ConfigError as exc:
        raise config.explain(exc) from None


def _room_command(
    config: Config, message: dict[str, Any], password_file: str | None = None
) -> dict[str, Any]:
    """Check ``message`` (exit 2), then have natterd or the database answer it (exit 1)."""
    from xmpp_server.modules.muc import admin
    from xmpp_server.modules.muc.service import service_domain

    options = _muc_options(config)
    try:
        admin.parse_request(
            message, service_domain(options.host, config.domain), options.max_occupants
        )
    except admin.InvalidRequest as exc:
        _fail(EXIT_USAGE, str(exc))
    if password_file is not None:
        message["password"] = _read_password(password_file)
    return asyncio.run(_room_request(config, options, message))


async def _room_request(
    config: Config, options: MucOptions, message: dict[str, Any]
) -> dict[str, Any]:
    from xmpp_server import control
    from xmpp_server.modules.muc import admin
    from xmpp_server.storage import RoomNotFound

    path = control.socket_path(config)
    try:
        answer = await control.request(path, message)
    except control.NotRunning:
        pass
    except (OSError, ValueError) as exc:  # permission denied, timeout, garbled answer
        _fail(EXIT_FAILED, f"control socket {path}: {exc}")
    else:
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            _fail(EXIT_FAILED, str(error or f"unexpected answer from natterd: {answer!r}"))
        return answer
    async with _storage(config) as storage:
        commands = admin.offline_commands(storage.rooms, options, config.domain)
        try:
            return await commands[message["command"]](message)
        except admin.InvalidRequest as exc:
            _fail(EXIT_USAGE, str(exc))
        except control.ControlError as exc:
            _fail(EXIT_FAILED, str(exc))
        except RoomNotFound as exc:  # deleted meanwhile
            _fail(EXIT_FAILED, str(exc))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value == "" or value is None:
        return "(none)"
    return str(value)


def _room_create(args: argparse.Namespace, config: Config) -> int:
    message: dict[str, Any] = {"command": "room.create", "room": args.room, "owners": args.owners}
    for key in ("name", "members_only", "public", "max_occupants", "whois"):
        if (value := getattr(args, key)) is not None:
            message[key] = value
    answer = _room_command(config, message, args.password_file)
    owners = ", ".join(answer["owners"]) or "none"
    _out(f"created room {answer['room']} (owners: {owners})")
    return EXIT_OK


def _room_list(args: argparse.Namespace, config: Config) -> int:
    answer = _room_command(config, {"command": "room.list"})
    for room in answer["rooms"]:
        flags = ["persistent" if room["persistent"] else "temporary"]
        if room["locked"]:
            flags.append("locked")
        flags.append("public" if room["public"] else "hidden")
        if room["members_only"]:
            flags.append("members-only")
        if room["password"]:
            flags.append("password")
        line = f"{room['room']}  {', '.join(flags)}"
        if room["occupants"] is not None:
            line += f"  {_count(room['occupants'], 'occupant')}"
        if room["name"]:
            line += f"  name: {room['name']}"
        _out(line)
    return EXIT_OK


def _room_show(args: argparse.Namespace, config: Config) -> int:
    answer = _room_command(config, {"command": "room.show", "room": args.room})
    _out(f"room: {answer['room']}")
    if answer["locked"]:
        _out("locked: yes (waiting for its creator's configuration)")
    for key, value in answer["config"].items():
        if key == "password":  # natterd never tells it
            value = "(set)" if value else ""
        _out(f"{key}: {_show_value(value)}")
    subject = _show_value(answer["subject"])
    if answer["subject"] and answer["subject_by"]:
        subject += f" (set by {answer['subject_by']})"
    _out(f"subject: {subject}")
    counts = [_count(n, kind) for kind, n in answer["affiliations"].items() if n]
    _out(f"affiliations: {', '.join(counts) or '(none)'}")
    if answer["occupants"] is not None:
        _out(f"occupants: {len(answer['occupants'])}")
        for occupant in answer["occupants"]:
            role = f"{occupant['role']}, {occupant['affiliation']}"
            _out(f"  {occupant['nick']}  {occupant['jid']}  {role}")
    return EXIT_OK


def _room_delete(args: argparse.Namespace, config: Config) -> int:
    message = {"command": "room.delete", "room": args.room}
    if args.reason:
        message["reason"] = args.reason
    answer = _room_command(config, message)
    told = f" ({_count(answer['occupants'], 'occupant')} told)" if answer["occupants"] else ""
    _out(f"deleted room {answer['room']}{told}")
    return EXIT_OK


def _room_members(args: argparse.Namespace, config: Config) -> int:
    message = {"command": "room.members", "room": args.room}
    if args.affiliation:
        message["affiliation"] = args.affiliation
    answer = _room_command(config, message)
    for member in answer["members"]:
        reason = f"  reason: {member['reason']}" if member["reason"] else ""
        _out(f"{member['jid']}  {member['affiliation']}{reason}")
    return EXIT_OK


def _room_affiliate(args: argparse.Namespace, config: Config) -> int:
    message = {
        "command": "room.affiliate",
        "room": args.room,
        "jid": args.jid,
        "affiliation": args.affiliation,
    }
    if args.reason:
        message["reason"] = args.reason
    answer = _room_command(config, message)
    jid, room, was = answer["jid"], answer["room"], answer["previous"]
    if answer["affiliation"] == "none":
        _out(f"{jid} has no affiliation with {room} now (was {was})")
    else:
        _out(f"{jid} is now {answer['affiliation']} in {room} (was {was})")
    if answer["removed"]:
        _out(f"removed from the room: {', '.join(answer['removed'])}")
    return EXIT_OK
