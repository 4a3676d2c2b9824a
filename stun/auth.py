"""Long-term credentials (RFC 8489 section 9.2) for TURN, checked against REST credentials.

Nonces are stateless: an expiry and an HMAC over it and the client's address, under a key
that lives as long as the process. Nothing is stored per client, a forged or replayed-from-
elsewhere nonce fails like an expired one (438), and a restart merely makes clients retry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from stun.credentials import turn_password
from stun.errors import StunError
from stun.message import PASSWORD_MD5, PASSWORD_SHA256, Message, long_term_key

NONCE_LIFETIME = 600.0
# RFC 8489 section 9.2: "obMatJos2" then the security features in base64; we set only
# bit 0, "Password algorithms" (no USERHASH: REST usernames cannot be looked up by hash).
NONCE_PREFIX = b"obMatJos2" + base64.b64encode(b"\x80\x00\x00")
PASSWORD_ALGORITHMS: list[tuple[int, bytes]] = [(PASSWORD_SHA256, b""), (PASSWORD_MD5, b"")]


class Nonces:
    """Issues and checks nonces bound to a client IP address and valid for ``lifetime``."""

    def __init__(self, key: bytes, lifetime: float = NONCE_LIFETIME) -> None:
        self._key = key
        self.lifetime = lifetime

    def _mac(self, expiry: bytes, source: str) -> bytes:
        digest = hmac.new(self._key, expiry + b"/" + source.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:15])

    def issue(self, source: str, now: float) -> bytes:
        expiry = b"%x" % int(now + self.lifetime)
        return NONCE_PREFIX + expiry + b"." + self._mac(expiry, source)

    def valid(self, nonce: bytes, source: str, now: float) -> bool:
        if not nonce.startswith(NONCE_PREFIX):
            return False
        expiry, _, mac = nonce[len(NONCE_PREFIX) :].partition(b".")
        try:
            if int(expiry, 16) < now:
                return False
        except ValueError:
            return False
        return hmac.compare_digest(mac, self._mac(expiry, source))


@dataclass(frozen=True)
class Credentials:
    """Who sent an authenticated request, and how to sign the answer."""

    username: str
    key: bytes
    sha256: bool
    """The request used MESSAGE-INTEGRITY-SHA256, so the response must too."""

    @property
    def user(self) -> str:
        """The account part of a REST username ("<expiry>:<user>"), for per-user quotas."""
        return self.username.partition(":")[2] or self.username

    def sign(self, response: Message) -> None:
        if self.sha256:
            response.add_message_integrity_sha256(self.key)
        else:
            response.add_message_integrity(self.key)


class LongTermAuth:
    """Checks a request's credentials in the order of RFC 8489 section 9.2.4."""

    def __init__(self, realm: str, secret: str, nonces: Nonces) -> None:
        self.realm = realm
        self.secret = secret
        self.nonces = nonces

    def challenge(self, source: str, now: float) -> dict[str, Any]:
        """What a 401 or 438 carries so the client can (re)compute its key."""
        return {
            "REALM": self.realm,
            "NONCE": self.nonces.issue(source, now),
            "PASSWORD-ALGORITHMS": PASSWORD_ALGORITHMS,
        }

    def authenticate(self, request: Message, source: str, now: float) -> Credentials:
        """The request's credentials, or a StunError: 401, 400 or 438."""
        attributes = request.attributes
        if "MESSAGE-INTEGRITY" not in attributes and "MESSAGE-INTEGRITY-SHA256" not in attributes:
            raise StunError(401)
        if "USERHASH" in attributes and "USERNAME" not in attributes:
            raise StunError(400, "USERHASH is not supported")
        for name in ("USERNAME", "REALM", "NONCE"):
            if name not in attributes:
                raise StunError(400, f"Missing {name} attribute")
        if not self.nonces.valid(attributes["NONCE"], source, now):
            raise StunError(438)
        algorithm = self._algorithm(request)
        username: str = attributes["USERNAME"]
        password = turn_password(self.secret, username, now)
        if attributes["REALM"] != self.realm or password is None:
            raise StunError(401)
        key = long_term_key(username, self.realm, password, algorithm)
        if not request.check_message_integrity(key):
            raise StunError(401)
        return Credentials(username, key, "MESSAGE-INTEGRITY-SHA256" in attributes)

    def _algorithm(self, request: Message) -> int:
        # Our nonces announce password algorithms, so the bid-down checks apply (9.2.4).
        chosen = request.attributes.get("PASSWORD-ALGORITHM")
        offered = request.attributes.get("PASSWORD-ALGORITHMS")
        if chosen is None and offered is None:
            return PASSWORD_MD5
        if chosen is None or offered != PASSWORD_ALGORITHMS or chosen not in offered:
            raise StunError(400, "PASSWORD-ALGORITHM does not match PASSWORD-ALGORITHMS")
        algorithm: int = chosen[0]
        return algorithm
