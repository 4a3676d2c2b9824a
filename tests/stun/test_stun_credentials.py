"""TURN REST credentials: the coturn `use-auth-secret` shape, expiry, the shared secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
from pathlib import Path

from stun.credentials import load_secret, turn_credentials, turn_password
from xmpp_server.config import build_config

NOW = 1_700_000_000.5


def test_credentials_follow_the_turn_rest_scheme() -> None:
    username, password = turn_credentials("s3cret", "alice@example.org", 3600, NOW)
    assert username == "1700003600:alice@example.org"
    expected = base64.b64encode(hmac.new(b"s3cret", username.encode(), hashlib.sha1).digest())
    assert password == expected.decode()


def test_password_is_recomputed_from_the_username() -> None:
    username, password = turn_credentials("s3cret", "bob", 60, NOW)
    assert turn_password("s3cret", username, NOW + 59) == password
    assert turn_password("other", username, NOW) != password


def test_expired_username_has_no_password() -> None:
    username, _ = turn_credentials("s3cret", "bob", 60, NOW)
    assert turn_password("s3cret", username, NOW + 61) is None


def test_malformed_usernames_have_no_password() -> None:
    for username in ["bob", "", ":bob", "12ab:bob", "-5:bob", "١٢٣٤٥٦٧٨٩٠١:bob"]:
        assert turn_password("s3cret", username, NOW) is None, username


def test_username_without_user_part_is_accepted_like_coturn() -> None:
    assert turn_password("s3cret", "1800000000", NOW) is not None


def test_configured_secret_wins(tmp_path: Path) -> None:
    config = build_config({"stun": {"secret": "configured"}}, base_dir=tmp_path)
    assert load_secret(config) == "configured"
    assert not (tmp_path / "data" / "turn.secret").exists()


def test_generated_secret_is_private_and_reused(tmp_path: Path) -> None:
    config = build_config({}, base_dir=tmp_path)
    first = load_secret(config)
    path = tmp_path / "data" / "turn.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert load_secret(config) == first
    assert load_secret(build_config({}, base_dir=tmp_path)) == first
    assert [p.name for p in path.parent.iterdir()] == ["turn.secret"]
