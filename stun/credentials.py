"""Time-limited TURN credentials (the TURN REST / coturn ``use-auth-secret`` scheme).

The XMPP server hands these out over XEP-0215 and the TURN server checks them, sharing only a
secret: no user database lookup is needed on the TURN side, and a credential expires by itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xmpp_server.config import Config

SECRET_FILE = "turn.secret"


def turn_password(secret: str, username: str, now: float) -> str | None:
    """The password for ``username`` ("<expiry unix>:<user>"); None if expired or malformed."""
    expiry_text = username.split(":", 1)[0]
    if not expiry_text.isdecimal() or not expiry_text.isascii():
        return None
    if int(expiry_text) < now:
        return None
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def turn_credentials(secret: str, user: str, ttl: int, now: float) -> tuple[str, str]:
    """A (username, password) pair for ``user`` that stays valid for ``ttl`` seconds."""
    username = f"{int(now) + ttl}:{user}"
    password = turn_password(secret, username, now)
    assert password is not None  # the expiry lies in the future by construction
    return username, password


def load_secret(config: Config) -> str:
    """``[stun] secret``, or the one generated into ``{data_dir}/turn.secret`` on first use.

    Every caller (the TURN server and the XEP-0215 module, even in separate processes) gets the
    same secret: the file is created atomically and only ever read afterwards.
    """
    if config.stun.secret:
        return config.stun.secret
    return _file_secret(config.data_dir / SECRET_FILE)


def _file_secret(path: Path) -> str:
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a private temporary file, then hard-link it into place: the link either wins the race
    # with a whole secret, or fails because another process already put its secret there.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty: delete it to generate a new TURN secret")
    return secret
