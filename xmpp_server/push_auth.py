"""Credentials of ``natterd push`` (sans-IO): signed JWTs and the caches that reuse them.

* FCM HTTP v1 wants an OAuth 2 access token. A Google service account gets one by posting
  an RS256-signed JWT assertion to its ``token_uri`` (RFC 7523 ``jwt-bearer`` grant); the
  token lives about an hour and is refreshed a little before it expires.
* APNs takes a provider token: an ES256 JWT signed with the team's .p8 key and sent as is.
  Apple rejects one older than an hour and throttles one renewed more often than every
  20 minutes, so it is reused for 50 minutes.

Everything here is pure: the caller reads the files, does the HTTP and passes the clock.
A JWT is three base64url parts (RFC 7515/7519); ES256 signatures are the raw ``r || s``
(64 bytes), not the DER that ``cryptography`` produces.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

Clock = Callable[[], float]
"""Seconds since the epoch (``time.time``); JWT ``iat``/``exp`` are wall-clock times."""

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
ASSERTION_LIFETIME = 3600  # Google's maximum for the assertion's exp - iat
REFRESH_EARLY = 300.0  # fetch a new access token this long before the old one expires
APNS_TOKEN_LIFETIME = 50 * 60.0  # Apple: older than 60 min is refused, newer than 20 throttled

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWS wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sign_jwt(
    claims: Mapping[str, Any], key: SigningKey, header: Mapping[str, str] | None = None
) -> str:
    """A compact JWS: RS256 for an RSA key, ES256 for a P-256 key (signature ``r || s``)."""
    if isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg = "ES256"
    else:
        raise TypeError("only RSA (RS256) and P-256 (ES256) keys can sign")
    signing_input = f"{b64url(_json({'alg': alg, **(header or {})}))}.{b64url(_json(claims))}"
    data = signing_input.encode("ascii")
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64url(signature)}"


# ---------------------------------------------------------------------------------------------
# FCM: service account → OAuth 2 access token


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a Google service-account key file the gateway needs."""

    client_email: str
    private_key: rsa.RSAPrivateKey
    project_id: str = ""
    token_uri: str = GOOGLE_TOKEN_URI
    private_key_id: str = ""

    @classmethod
    def from_json(cls, text: str | bytes) -> ServiceAccount:
        """Parse a key file as the Google console downloads it; ``ValueError`` says what is
        wrong with it."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name in ("client_email", "private_key"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"no {name!r}")
        try:
            key = serialization.load_pem_private_key(data["private_key"].encode(), None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"private_key is not a PEM private key ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("private_key is not an RSA key")
        return cls(
            client_email=data["client_email"],
            private_key=key,
            project_id=str(data.get("project_id") or ""),
            token_uri=str(data.get("token_uri") or GOOGLE_TOKEN_URI),
            private_key_id=str(data.get("private_key_id") or ""),
        )


def fcm_assertion(account: ServiceAccount, now: float) -> str:
    """The signed JWT that the token endpoint exchanges for an access token."""
    iat = int(now)
    claims = {
        "iss": account.client_email,
        "scope": FCM_SCOPE,
        "aud": account.token_uri,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME,
    }
    header = {"typ": "JWT"}
    if account.private_key_id:
        header["kid"] = account.private_key_id
    return sign_jwt(claims, account.private_key, header)


def token_request(account: ServiceAccount, now: float) -> dict[str, str]:
    """The form fields to post (``application/x-www-form-urlencoded``) to ``token_uri``."""
    return {"grant_type": JWT_BEARER_GRANT, "assertion": fcm_assertion(account, now)}


def parse_token_response(body: Any) -> tuple[str, float]:
    """``(access_token, expires_in)`` from the token endpoint's JSON answer."""
    if not isinstance(body, dict):
        raise ValueError("the token response is not a JSON object")
    token, expires_in = body.get("access_token"), body.get("expires_in", 3600)
    if not isinstance(token, str) or not token:
        raise ValueError("the token response has no access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise ValueError(f"the token response has a bad expires_in: {expires_in!r}")
    return token, float(expires_in)


class AccessTokenCache:
    """One OAuth 2 access token, considered stale ``refresh_early`` seconds before it expires
    (at most half its lifetime early, so short-lived tokens are still used)."""

    def __init__(self, clock: Clock = time.time, refresh_early: float = REFRESH_EARLY) -> None:
        self.clock = clock
        self.refresh_early = refresh_early
        self._token: str | None = None
        self._refresh_at = 0.0

    def current(self) -> str | None:
        """The token to use now, or None when a new one must be fetched."""
        if self._token is not None and self.clock() < self._refresh_at:
            return self._token
        return None

    def store(self, token: str, expires_in: float) -> None:
        early = min(self.refresh_early, expires_in / 2)
        self._token, self._refresh_at = token, self.clock() + expires_in - early

    def invalidate(self, token: str) -> None:
        """The service refused ``token``; forget it unless a newer one already replaced it,
        so that many requests refused together cause a single refresh."""
        if token == self._token:
            self._token = None


# ---------------------------------------------------------------------------------------------
# APNs: .p8 key → provider token


def load_apns_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key of an APNs ``AuthKey_<key id>.p8`` file."""
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an EC P-256 key")
    return key


def apns_provider_token(
    key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, now: float
) -> str:
    return sign_jwt({"iss": team_id, "iat": int(now)}, key, {"kid": key_id})


class ProviderTokenCache:
    """The APNs provider token, signed again once it is ``lifetime`` seconds old or when
    APNs answered ``ExpiredProviderToken``."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        clock: Clock = time.time,
        lifetime: float = APNS_TOKEN_LIFETIME,
    ) -> None:
        self.key, self.key_id, self.team_id = key, key_id, team_id
        self.clock = clock
        self.lifetime = lifetime
        self._token: str | None = None
        self._issued_at = 0.0

    def token(self) -> str:
        now = self.clock()
        if self._token is None or now - self._issued_at >= self.lifetime:
            self._token = apns_provider_token(self.key, self.key_id, self.team_id, now)
            self._issued_at = now
        return self._token

    def expired(self, token: str) -> None:
        """APNs called ``token`` expired (a clock off by much): sign a new one next time."""
        if token == self._token:
            self._token = None
