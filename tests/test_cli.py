"""natterctl and natterd, called as functions with a configuration written to tmp_path."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import xmpp_server
from xmpp_server.cli import configure_logging, ctl_main, main
from xmpp_server.config import ConfigError, load_config
from xmpp_server.credentials import derive_credentials
from xmpp_server.storage import NotMigrated, Storage


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own NATTERD_* variables must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("NATTERD_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "natterd.toml"
    path.write_text(
        f'[server]\ndomain = "localhost"\ndata_dir = "data"\n[storage]\nurl = "{url}"\n{extra}',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, "sqlite+aiosqlite:///{data_dir}/natterd.sqlite3")


@pytest.fixture
def config_file(tmp_path: Path, db_url: str) -> Path:
    """A configuration on an empty database, once per backend."""
    return write_config(tmp_path, db_url)


@pytest.fixture
def migrated(config_file: Path) -> Path:
    assert ctl_main(["--config", str(config_file), "db", "upgrade"]) == 0
    return config_file


def ctl(config: Path, *args: str) -> int:
    return ctl_main(["--config", str(config), *args])


def password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "password.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def stored_key(config: Path, user: str) -> bytes:
    async def read() -> bytes:
        storage = await Storage.open(load_config(config, env={}).storage.url)
        try:
            creds = await storage.accounts.credentials(user, "SCRAM-SHA-256")
        finally:
            await storage.close()
        assert creds is not None
        return creds.stored_key

    return asyncio.run(read())


def assert_password(config: Path, user: str, password: str) -> None:
    async def read() -> None:
        storage = await Storage.open(load_config(config, env={}).storage.url)
        try:
            for family in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
                creds = await storage.accounts.credentials(user, family)
                assert creds is not None
                expected = derive_credentials(family, password, creds.iterations, creds.salt)
                assert creds == expected
        finally:
            await storage.close()

    asyncio.run(read())


# ------------------------------------------------------------------------------------- db


def test_db_status_upgrade_status(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(config_file, "db", "status") == 3
    out = capsys.readouterr().out
    assert "current:  none (empty database)" in out
    assert "run: natterctl db upgrade" in out
    assert ctl(config_file, "db", "upgrade") == 0
    assert "database is at schema revision" in capsys.readouterr().out
    assert ctl(config_file, "db", "status") == 0
    assert "status:   up to date" in capsys.readouterr().out
    assert ctl(config_file, "db", "upgrade") == 0  # idempotent


def test_user_commands_refuse_an_unmigrated_database(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl(config_file, "user", "add", "alice@localhost", "--password-file", "/dev/null")
    assert code == 3
    assert "natterctl db upgrade" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- users


def test_user_lifecycle(
    migrated: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = password_file(tmp_path, "correct horse\nsecond line ignored\n")
    assert ctl(migrated, "user", "add", "Alice@LocalHost", "--password-file", secret) == 0
    assert capsys.readouterr().out == "created user alice@localhost\n"
    assert_password(migrated, "alice@localhost", "correct horse")

    assert ctl(migrated, "user", "add", "alice@localhost", "--password-file", secret) == 1
    assert capsys.readouterr().err == "natterctl: user alice@localhost already exists\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\r\n"))
    assert ctl(migrated, "user", "add", "bob@localhost", "--password-file", "-") == 0
    assert_password(migrated, "bob@localhost", "from stdin")

    capsys.readouterr()
    assert ctl(migrated, "user", "list") == 0
    assert capsys.readouterr().out == "alice@localhost\nbob@localhost\n"
    assert ctl(migrated, "user", "list", "--domain", "other.example") == 0
    assert capsys.readouterr().out == ""

    assert ctl(migrated, "user", "show", "alice@localhost") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "user: alice@localhost"
    assert out[1].startswith("created_at: 20")
    assert out[2] == "mechanisms: SCRAM-SHA-1, SCRAM-SHA-256"

    before = stored_key(migrated, "alice@localhost")
    new = password_file(tmp_path, "battery staple")
    assert ctl(migrated, "user", "passwd", "alice@localhost", "--password-file", new) == 0
    assert capsys.readouterr().out == "password changed for alice@localhost\n"
    assert stored_key(migrated, "alice@localhost") != before
    assert_password(migrated, "alice@localhost", "battery staple")

    assert ctl(migrated, "user", "delete", "alice@localhost") == 0
    assert capsys.readouterr().out == "deleted user alice@localhost\n"
    assert ctl(migrated, "user", "delete", "alice@localhost") == 1
    assert capsys.readouterr().err == "natterctl: no such user alice@localhost\n"
    assert ctl(migrated, "user", "show", "alice@localhost") == 1
    assert ctl(migrated, "user", "passwd", "alice@localhost", "--password-file", new) == 1
    assert "no such user alice@localhost" in capsys.readouterr().err
    assert ctl(migrated, "user", "list") == 0
    assert capsys.readouterr().out == "bob@localhost\n"


def test_user_add_prompts_twice(
    migrated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["typed secret", "typed secret"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert ctl(migrated, "user", "add", "carol@localhost") == 0
    assert_password(migrated, "carol@localhost", "typed secret")

    answers = iter(["one", "other"])
    assert ctl(migrated, "user", "add", "dave@localhost") == 2
    assert capsys.readouterr().err == "natterctl: passwords do not match\n"


@pytest.mark.parametrize(
    ("jid", "message"),
    [
        ("alice@", "invalid JID 'alice@': JID domainpart is empty"),
        ("", "invalid JID '': JID is empty"),
        ("localhost", "invalid JID 'localhost': expected a bare JID like alice@localhost"),
        ("alice@localhost/phone", "invalid JID 'alice@localhost/phone': expected a bare JID"),
        ("alice@example.org", "unknown domain 'example.org' (this server serves: localhost)"),
    ],
)
@pytest.mark.parametrize("command", ["add", "passwd", "delete", "show"])
def test_user_commands_reject_bad_jids(
    sqlite_config: Path, command: str, jid: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(sqlite_config, "user", command, jid) == 2
    assert capsys.readouterr().err.startswith(f"natterctl: {message}")


@pytest.mark.parametrize(
    ("content", "message"),
    [("\n", "empty password"), ("", "empty password"), ("\x07bell\n", "invalid password: ")],
)
def test_bad_passwords_are_refused(
    migrated: Path,
    tmp_path: Path,
    content: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = password_file(tmp_path, content)
    assert ctl(migrated, "user", "add", "eve@localhost", "--password-file", secret) == 2
    assert capsys.readouterr().err.startswith(f"natterctl: {message}")
    assert ctl(migrated, "user", "show", "eve@localhost") == 1


def test_missing_password_file(
    migrated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope")
    assert ctl(migrated, "user", "add", "eve@localhost", "--password-file", missing) == 2
    assert capsys.readouterr().err.startswith(f"natterctl: cannot read password file {missing}")


def test_user_list_rejects_a_bad_domain(
    sqlite_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(sqlite_config, "user", "list", "--domain", "alice@localhost") == 2
    assert "invalid domain 'alice@localhost'" in capsys.readouterr().err


def test_unreachable_database_is_a_failure_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "postgresql+asyncpg://natter:s3cret@127.0.0.1:1/natter")
    assert ctl(config, "user", "list") == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "natterctl: database postgresql+asyncpg://natter:***@127.0.0.1:1/natter: "
    )
    assert "s3cret" not in err


# ------------------------------------------------------------------------- config and certs


def test_check_config_ok(sqlite_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(sqlite_config, "check-config") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"configuration OK: {sqlite_config}\n")
    assert "  domain:    localhost\n" in out
    assert f"  data_dir:  {sqlite_config.parent / 'data'}\n" in out


def test_check_config_hides_the_database_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "postgresql+asyncpg://natter:s3cret@db.example/natter")
    assert ctl(config, "check-config") == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "natter:***@db.example" in out


def test_check_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "sqlite+aiosqlite://", "[c2s]\nport = 99999\n")
    assert ctl(config, "check-config") == 2
    assert capsys.readouterr().err == (
        "natterctl: c2s.port: expected an integer between 0 and 65535, got 99999\n"
    )


def test_check_config_validates_module_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = pytest.importorskip("xmpp_server.modules")
    if not hasattr(modules, "validate_module_options"):
        pytest.skip("the module registry has no validate_module_options")
    config = write_config(tmp_path, "sqlite+aiosqlite://", "[modules.no_such_module]\n")
    assert ctl(config, "check-config") == 2
    assert "modules.no_such_module" in capsys.readouterr().err


def test_config_option_after_the_command(
    sqlite_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl_main(["check-config", "--config", str(sqlite_config)]) == 0
    assert str(sqlite_config) in capsys.readouterr().out


def test_config_from_environment(
    sqlite_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATTERD_CONFIG", str(sqlite_config))
    monkeypatch.setenv("NATTERD_SERVER__DOMAIN", "example.net")
    assert ctl_main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "  domain:    example.net\n" in out
    assert "  override:  server.domain from NATTERD_SERVER__DOMAIN\n" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main(["user"]) == 2
    assert ctl_main(["frobnicate"]) == 2
    assert ctl_main([]) == 2
    assert ctl_main(["--help"]) == 0
    assert "user" in capsys.readouterr().out


def test_cert_generate(sqlite_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = sqlite_config.parent / "data" / "tls" / "localhost.crt"
    key = sqlite_config.parent / "data" / "tls" / "localhost.key"
    assert ctl(sqlite_config, "cert", "generate") == 0
    assert cert.is_file() and key.is_file()
    first = cert.read_bytes()
    assert ctl(sqlite_config, "cert", "generate") == 1
    assert "use --force to replace" in capsys.readouterr().err
    assert cert.read_bytes() == first
    assert ctl(sqlite_config, "cert", "generate", "--force") == 0
    assert cert.read_bytes() != first


def test_cert_generate_if_missing(sqlite_config: Path) -> None:
    cert = sqlite_config.parent / "data" / "tls" / "localhost.crt"
    key = sqlite_config.parent / "data" / "tls" / "localhost.key"
    assert ctl(sqlite_config, "cert", "generate", "--if-missing") == 0
    first = cert.read_bytes()
    assert ctl(sqlite_config, "cert", "generate", "--if-missing") == 0
    assert cert.read_bytes() == first
    key.unlink()  # half a pair is regenerated whole
    assert ctl(sqlite_config, "cert", "generate", "--if-missing") == 0
    assert key.is_file() and cert.read_bytes() != first
    assert ctl(sqlite_config, "cert", "generate", "--if-missing", "--force") == 2


# ----------------------------------------------------------------------------------- natterd


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException | None]]:
    """Replace xmpp_server.server with a serve() that raises what the test puts in the list."""
    outcome: list[BaseException | None] = [None]
    module = types.ModuleType("xmpp_server.server")

    async def serve(config: object) -> None:
        if outcome[0] is not None:
            raise outcome[0]

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xmpp_server.server", module)
    monkeypatch.setattr(xmpp_server, "server", module, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield outcome
    root.handlers[:] = handlers
    root.setLevel(level)


def test_natterd_runs_and_stops(sqlite_config: Path, fake_server: list[BaseException]) -> None:
    assert main(["--config", str(sqlite_config)]) == 0
    assert main(["--config", str(sqlite_config), "run"]) == 0
    fake_server[0] = KeyboardInterrupt()
    assert main(["run", "--config", str(sqlite_config)]) == 0


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (NotMigrated("sqlite+aiosqlite:///x", None, "0001"), 3, "natterctl db upgrade"),
        (ConfigError("file not found: /x.crt", "tls.cert_file"), 2, "tls.cert_file: file not"),
        (OSError(98, "Address already in use"), 1, "cannot serve: [Errno 98] Address already"),
    ],
)
def test_natterd_failures(
    sqlite_config: Path,
    fake_server: list[BaseException],
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    code: int,
    message: str,
) -> None:
    fake_server[0] = error
    assert main(["--config", str(sqlite_config)]) == code
    err = capsys.readouterr().err
    assert err.startswith("natterd: ") and message in err


def test_natterd_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\ndomain = 5\n")
    assert main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == "natterd: server.domain: expected a string, got 5\n"


def test_json_logging(
    tmp_path: Path, fake_server: object, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(
        write_config(tmp_path, "sqlite+aiosqlite://", '[logging]\nformat = "json"\n'), env={}
    )
    configure_logging(config)
    logging.getLogger("natter.test").info("hello %s", "world")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"
    assert entry["logger"] == "natter.test"
