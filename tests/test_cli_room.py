"""``natterctl room …`` without a running natterd: straight on the database, on both backends.

(tests/e2e/test_natterctl_room.py drives the same commands through a live server.)
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xmpp_server.cli import ctl_main
from xmpp_server.config import load_config
from xmpp_server.storage import Affiliation, Storage

T = TypeVar("T")
ROOM = "team@conference.localhost"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NATTERD_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path: Path, migrated_db_url: str) -> Path:
    path = tmp_path / "natterd.toml"
    path.write_text(
        f'[server]\ndomain = "localhost"\ndata_dir = "data"\n'
        f'[storage]\nurl = "{migrated_db_url}"\n',
        encoding="utf-8",
    )
    return path


def ctl(config: Path, *args: str) -> int:
    return ctl_main(["--config", str(config), *args])


def run(
    capsys: pytest.CaptureFixture[str], config: Path, *args: str, code: int = 0
) -> tuple[str, str]:
    """natterctl's (stdout, stderr), asserting its exit code."""
    assert ctl(config, *args) == code, capsys.readouterr()
    captured = capsys.readouterr()
    return captured.out, captured.err


def with_storage(config: Path, use: Callable[[Storage], Awaitable[T]]) -> T:
    async def go() -> T:
        storage = await Storage.open(load_config(config, env={}).storage.url)
        try:
            return await use(storage)
        finally:
            await storage.close()

    return asyncio.run(go())


def stored_config(config: Path, room: str) -> dict[str, Any]:
    async def get(storage: Storage) -> dict[str, Any]:
        stored = await storage.rooms.get(room)
        assert stored is not None
        return stored.config

    return with_storage(config, get)


def stored_affiliations(config: Path, room: str) -> list[Affiliation]:
    async def get(storage: Storage) -> list[Affiliation]:
        return await storage.rooms.affiliations(room)

    return with_storage(config, get)


def test_create_list_show(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = run(
        capsys,
        config,
        "room",
        "create",
        "team",
        "--owner",
        "Alice@localhost",
        "--owner",
        "carol@example.org",
        "--name",
        "The Team",
        "--members-only",
        "--max-occupants",
        "50",
        "--whois",
        "anyone",
    )
    assert out == f"created room {ROOM} (owners: alice@localhost, carol@example.org)\n"
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\nignored\n", encoding="utf-8")
    out, _ = run(
        capsys,
        config,
        "room",
        "create",
        "Hideout@Conference.localhost",
        "--hidden",
        "--password-file",
        str(secret),
    )
    assert out == "created room hideout@conference.localhost (owners: none)\n"

    # What natterd will load: a persistent, configured room with its owners.
    team = stored_config(config, ROOM)
    assert team["persistent"] is True
    assert (team["name"], team["members_only"], team["public"]) == ("The Team", True, True)
    assert (team["max_occupants"], team["whois"], team["password"]) == (50, "anyone", "")
    assert [(a.jid, a.affiliation) for a in stored_affiliations(config, ROOM)] == [
        ("alice@localhost", "owner"),
        ("carol@example.org", "owner"),
    ]
    hideout = stored_config(config, "hideout@conference.localhost")
    assert hideout["persistent"] is True and hideout["public"] is False
    assert hideout["password"] == "hunter2"
    assert hideout["members_only"] is False and hideout["whois"] == "moderators"  # defaults

    out, _ = run(capsys, config, "room", "list")
    assert out == (
        "hideout@conference.localhost  persistent, hidden, password\n"
        f"{ROOM}  persistent, public, members-only  name: The Team\n"
    )
    out, _ = run(capsys, config, "room", "show", "team")
    assert out == (
        f"room: {ROOM}\n"
        "name: The Team\n"
        "description: (none)\n"
        "persistent: yes\n"
        "public: yes\n"
        "members_only: yes\n"
        "moderated: no\n"
        "password: (none)\n"
        "max_occupants: 50\n"
        "whois: anyone\n"
        "allow_pm: anyone\n"
        "change_subject: no\n"
        "allow_invites: no\n"
        "archive: yes\n"
        "subject: (none)\n"
        "affiliations: 2 owners\n"
    )
    out, _ = run(capsys, config, "room", "show", "hideout@conference.localhost")
    assert "password: (set)\n" in out and "hunter2" not in out

    # A subject set in the room (natterd stores it) shows with its author.
    async def subject(storage: Storage) -> None:
        await storage.rooms.set_subject(ROOM, "Release on Friday", "alice")

    with_storage(config, subject)
    out, _ = run(capsys, config, "room", "show", ROOM)
    assert "subject: Release on Friday (set by alice)\n" in out

    _, err = run(capsys, config, "room", "create", "TEAM", code=1)
    assert err == f"natterctl: room {ROOM} exists already\n"
    assert stored_config(config, ROOM)["name"] == "The Team"  # untouched


def test_password_from_stdin(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    run(capsys, config, "room", "create", "locked", "--password-file", "-")
    assert stored_config(config, "locked@conference.localhost")["password"] == "s3cret"


def test_affiliations(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, config, "room", "create", "team", "--owner", "alice@localhost")

    out, _ = run(capsys, config, "room", "affiliate", "team", "bob@localhost", "member")
    assert out == f"bob@localhost is now member in {ROOM} (was none)\n"
    out, _ = run(
        capsys,
        config,
        "room",
        "affiliate",
        ROOM,
        "mallory@evil.example",
        "outcast",
        "--reason",
        "spam",
    )
    assert out == f"mallory@evil.example is now outcast in {ROOM} (was none)\n"
    run(capsys, config, "room", "affiliate", "team", "dave@localhost", "admin")

    out, _ = run(capsys, config, "room", "members", "team")
    assert out == (
        "alice@localhost  owner\n"
        "dave@localhost  admin\n"
        "bob@localhost  member\n"
        "mallory@evil.example  outcast  reason: spam\n"
    )
    out, _ = run(capsys, config, "room", "members", "team", "--affiliation", "outcast")
    assert out == "mallory@evil.example  outcast  reason: spam\n"
    out, _ = run(capsys, config, "room", "show", "team")
    assert "affiliations: 1 owner, 1 admin, 1 member, 1 outcast\n" in out

    out, _ = run(capsys, config, "room", "affiliate", "team", "bob@localhost", "none")
    assert out == f"bob@localhost has no affiliation with {ROOM} now (was member)\n"
    out, _ = run(capsys, config, "room", "members", "team", "--affiliation", "member")
    assert out == ""

    # The last owner stays: the room would have nobody to administer it from XMPP.
    for change in ("admin", "member", "outcast", "none"):
        _, err = run(capsys, config, "room", "affiliate", "team", "alice@localhost", change, code=1)
        assert err == (
            f"natterctl: alice@localhost is the last owner of {ROOM}; make another owner first\n"
        )
    run(capsys, config, "room", "affiliate", "team", "dave@localhost", "owner")
    out, _ = run(capsys, config, "room", "affiliate", "team", "alice@localhost", "member")
    assert out == f"alice@localhost is now member in {ROOM} (was owner)\n"

    assert [(a.jid, a.affiliation, a.reason) for a in stored_affiliations(config, ROOM)] == [
        ("alice@localhost", "member", None),
        ("mallory@evil.example", "outcast", "spam"),
        ("dave@localhost", "owner", None),
    ]


def test_delete(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, config, "room", "create", "team", "--owner", "alice@localhost")
    run(capsys, config, "room", "create", "other")
    out, _ = run(capsys, config, "room", "delete", "team", "--reason", "moved")
    assert out == f"deleted room {ROOM}\n"
    out, _ = run(capsys, config, "room", "list")
    assert out == "other@conference.localhost  persistent, public\n"
    assert stored_affiliations(config, ROOM) == []
    _, err = run(capsys, config, "room", "delete", "team", code=1)
    assert err == f"natterctl: no room {ROOM}\n"
    # The name is free again.
    run(capsys, config, "room", "create", "team")


def test_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ("show", "nowhere"),
        ("delete", "nowhere"),
        ("members", "nowhere"),
        ("affiliate", "nowhere", "bob@localhost", "member"),
    ):
        _, err = run(capsys, config, "room", *args, code=1)
        assert err == "natterctl: no room nowhere@conference.localhost\n"

    run(capsys, config, "room", "create", "team")
    usage = [
        (
            ("create", "team@conference.example.org"),
            "natterctl: room 'team@conference.example.org' is not on this server's MUC service"
            " conference.localhost (set [modules.muc] host to manage another)\n",
        ),
        (
            ("show", "team@localhost"),
            "natterctl: room 'team@localhost' is not on this server's MUC service"
            " conference.localhost (set [modules.muc] host to manage another)\n",
        ),
        (
            ("create", "two words"),
            "natterctl: invalid room 'two words': JID localpart contains a forbidden"
            " character U+0020\n",
        ),
        (
            ("show", f"{ROOM}/nick"),
            f"natterctl: invalid room '{ROOM}/nick':"
            " expected a name or name@conference.localhost\n",
        ),
        (
            ("create", "new", "--owner", "alice@localhost/phone"),
            "natterctl: invalid JID 'alice@localhost/phone':"
            " expected a bare JID like user@domain\n",
        ),
        (
            ("affiliate", "team", "spam.example", "outcast"),
            "natterctl: invalid JID 'spam.example': expected a bare JID like user@domain\n",
        ),
        (
            ("affiliate", "team", "bob@", "member"),
            "natterctl: invalid JID 'bob@': JID domainpart is empty\n",
        ),
        (
            ("create", "new", "--max-occupants", "0"),
            "natterctl: max_occupants must be between 1 and 5000"
            " (the service's limit, [modules.muc] max_occupants)\n",
        ),
    ]
    for args, message in usage:
        _, err = run(capsys, config, "room", *args, code=2)
        assert err == message
    # argparse's own checks.
    run(capsys, config, "room", "affiliate", "team", "bob@localhost", "king", code=2)
    run(capsys, config, "room", "create", "new", "--whois", "everyone", code=2)
    out, _ = run(capsys, config, "room", "list")
    assert out == f"{ROOM}  persistent, public\n"  # nothing else was created


def test_service_host_and_options(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(
        config.read_text()
        + "[modules.muc]\n"
        + 'host = "Chat.localhost"\nmax_occupants = 20\n'
        + 'default_members_only = true\ndefault_whois = "anyone"\n',
        encoding="utf-8",
    )
    out, _ = run(capsys, config, "room", "create", "team")
    assert out == "created room team@chat.localhost (owners: none)\n"
    created = stored_config(config, "team@chat.localhost")
    assert (created["members_only"], created["whois"], created["max_occupants"]) == (
        True,
        "anyone",
        20,
    )
    _, err = run(capsys, config, "room", "show", ROOM, code=2)
    assert "not on this server's MUC service chat.localhost" in err
    run(capsys, config, "room", "create", "big", "--max-occupants", "21", code=2)

    config.write_text(config.read_text() + "enabled = false\n", encoding="utf-8")
    _, err = run(capsys, config, "room", "list", code=2)
    assert err == "natterctl: the muc module is off ([modules.muc] enabled = false)\n"
