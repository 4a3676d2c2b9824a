"""SASL for client streams (RFC 6120 §6) as sans-IO state machines.

Mechanisms: SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677), their -PLUS
channel-binding variants (RFC 5929 tls-server-end-point, RFC 9266 tls-exporter,
tls-unique), and PLAIN (RFC 4616, only over TLS).

A mechanism never touches storage: when it learns the username it returns
:class:`NeedCredentials`, the caller loads the :class:`ScramCredentials` row for
``mechanism.credentials_mechanism`` and calls ``provide_credentials()`` (``None``
if the account does not exist). Unknown users are answered like known ones until
the very end, so the exchange does not reveal which accounts exist.

The mechanism cannot know the server's domain, so it only *exposes* ``authzid``;
the caller must accept it only if it is absent or names the authenticated
account's own bare JID, and otherwise fail with ``invalid-authzid``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import stringprep
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from xmpp_server.credentials import (
    HASHES,
    MIN_ITERATIONS,
    ScramCredentials,
    credentials_from_salted,
    derive_credentials,
    salted_password,
)

CONDITIONS = frozenset(
    {
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    }
)

SUPPORTED_MECHANISMS = (
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-1",
    "PLAIN",
)

# Far above anything a legitimate client sends; bounds parsing work per message.
MAX_MESSAGE_OCTETS = 4096

# Used when the caller passes no secret: fake salts then change on restart, which
# lets a patient attacker tell real accounts from fake ones. Pass a persistent one.
PROCESS_FAKE_SECRET = os.urandom(32)


class SaslFailure(Exception):
    """Ends the exchange with ``<failure><condition/><text/></failure>``."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown SASL failure condition {condition!r}")
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


@dataclass(frozen=True, slots=True)
class Success:
    data: bytes | None


@dataclass(frozen=True, slots=True)
class NeedCredentials:
    username: str


@dataclass(frozen=True, slots=True)
class ChannelBindings:
    """What the TLS layer can bind to: cb type name -> cb data; empty without TLS."""

    data: dict[str, bytes] = field(default_factory=dict)


Step = Challenge | Success | NeedCredentials


# --------------------------------------------------------------------------- SASLprep


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
    )


def saslprep(text: str, *, allow_unassigned: bool = False) -> str:
    """RFC 4013 SASLprep; raises ValueError on prohibited output or a bidi violation.

    Stringprep is pinned to Unicode 3.2, so normalisation uses those tables too:
    the result must never change under a newer Python. Stored strings (new
    passwords) reject unassigned code points; ``allow_unassigned`` is for queries
    such as a username or password presented at login (RFC 3454 §7).
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    out = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for ch in out:
        if _prohibited(ch):
            raise ValueError(f"SASLprep: prohibited character U+{ord(ch):04X}")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise ValueError(f"SASLprep: unassigned code point U+{ord(ch):04X}")
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end with RTL")
    return out


def make_credentials(password: str, iterations: int) -> list[ScramCredentials]:
    """Credentials for both SCRAM families, each with its own salt (for natterctl)."""
    prepped = saslprep(password)
    if not prepped:
        raise ValueError("password is empty after SASLprep")
    return [derive_credentials(family, prepped, iterations) for family in HASHES]


# ---------------------------------------------------------------- channel binding


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 §4.1 binding data for our own certificate.

    Raises ValueError when the signature uses no single hash (e.g. Ed25519):
    the binding is undefined then, so the type must simply not be offered.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"tls-server-end-point undefined: {exc}") from None
    if algorithm is None:
        raise ValueError("tls-server-end-point undefined for a signature without a hash")
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


# ------------------------------------------------------------------- mechanisms


class _Stage(enum.Enum):
    NEW = enum.auto()
    AWAIT_FIRST = enum.auto()
    AWAIT_CREDENTIALS = enum.auto()
    AWAIT_FINAL = enum.auto()
    DONE = enum.auto()


class Mechanism(ABC):
    """One server-side exchange; every method raises :class:`SaslFailure` on failure.

    Once a step has failed or succeeded the exchange is over and anything further
    from the peer is ``malformed-request``. Calling ``start`` twice or
    ``provide_credentials`` without a pending :class:`NeedCredentials` is a bug in
    the caller and raises RuntimeError instead.
    """

    name: str

    def __init__(self, family: str, fake_secret: bytes, fake_iterations: int) -> None:
        self.authcid: str | None = None
        self.authzid: str | None = None
        self._family = family
        self._fake_secret = fake_secret
        self._fake_iterations = fake_iterations
        self._stage = _Stage.NEW

    @property
    def credentials_mechanism(self) -> str:
        """The SCRAM family whose stored row the caller must load."""
        return self._family

    def start(self, initial: bytes | None) -> Step:
        if self._stage is not _Stage.NEW:
            raise RuntimeError("SASL exchange already started")
        self._stage = _Stage.AWAIT_FIRST
        if initial is None:
            # RFC 6120 §6.4.2: client-first mechanisms get an empty challenge.
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        stage, self._stage = self._stage, _Stage.DONE  # any failure ends the exchange
        if stage is _Stage.AWAIT_FIRST:
            return self._first(data)
        if stage is _Stage.AWAIT_FINAL:
            return self._final(data)
        raise SaslFailure("malformed-request", "unexpected response")

    def provide_credentials(self, creds: ScramCredentials | None) -> Challenge | Success:
        if self._stage is not _Stage.AWAIT_CREDENTIALS:
            raise RuntimeError("no credentials were asked for")
        assert self.authcid is not None
        fake = creds is None
        if creds is None:
            creds = _fake_credentials(
                self._family, self.authcid, self._fake_secret, self._fake_iterations
            )
        elif creds.mechanism != self._family and not self._accepts_any_family():
            raise ValueError(f"{self.name} needs {self._family} credentials")
        self._stage = _Stage.DONE
        return self._with_credentials(creds, fake)

    def _accepts_any_family(self) -> bool:
        return False

    @abstractmethod
    def _first(self, data: bytes) -> Step: ...

    @abstractmethod
    def _with_credentials(self, creds: ScramCredentials, fake: bool) -> Challenge | Success: ...

    def _final(self, data: bytes) -> Step:  # only SCRAM has a second client message
        raise SaslFailure("malformed-request", "unexpected response")


def _fake_credentials(
    family: str, username: str, secret: bytes, iterations: int
) -> ScramCredentials:
    """Stable per (secret, username) so repeated probes see the same salt, as for a real user."""
    tag = family.encode() + b"\0" + username.encode()
    salt = hmac.new(secret, b"natter fake salt\0" + tag, "sha256").digest()[:16]
    salted = hmac.new(secret, b"natter fake key\0" + tag, HASHES[family]).digest()
    return credentials_from_salted(family, salted, salt, iterations)


def _utf8(data: bytes) -> str:
    if len(data) > MAX_MESSAGE_OCTETS:
        raise SaslFailure("malformed-request", "message too long")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslFailure("incorrect-encoding", "not UTF-8") from None


class Plain(Mechanism):
    """RFC 4616; verified against the stored SCRAM row, so no password is ever stored."""

    name = "PLAIN"

    def __init__(self, fake_secret: bytes, fake_iterations: int) -> None:
        super().__init__("SCRAM-SHA-256", fake_secret, fake_iterations)
        self.password_verified = False
        self._password: str | None = None

    def _accepts_any_family(self) -> bool:
        return True

    def _first(self, data: bytes) -> Step:
        parts = _utf8(data).split("\0")
        if len(parts) != 3:
            raise SaslFailure("malformed-request", "expected authzid NUL authcid NUL password")
        authzid, authcid, password = parts
        try:
            authcid = saslprep(authcid, allow_unassigned=True)
            password = saslprep(password, allow_unassigned=True)
        except ValueError:
            # RFC 4616 §4: failed preparation means failed verification.
            raise SaslFailure("not-authorized") from None
        if not authcid or not password:
            raise SaslFailure("not-authorized")
        self.authcid = authcid
        self.authzid = authzid or None
        self._password = password
        self._stage = _Stage.AWAIT_CREDENTIALS
        return NeedCredentials(authcid)

    def _with_credentials(self, creds: ScramCredentials, fake: bool) -> Success:
        password, self._password = self._password, None
        assert password is not None
        # Unknown users pay the same key stretching, so timing does not tell them apart.
        salted = salted_password(creds.mechanism, password, creds.salt, creds.iterations)
        derived = credentials_from_salted(creds.mechanism, salted, creds.salt, creds.iterations)
        del password, salted
        if not hmac.compare_digest(derived.stored_key, creds.stored_key) or fake:
            raise SaslFailure("not-authorized")
        self.password_verified = True
        return Success(None)


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SaslFailure("incorrect-encoding", "invalid base64") from None


def _saslname(value: str) -> str:
    """Decode a SCRAM saslname: only =2C and =3D may follow '='."""
    if not value or "\0" in value:
        raise SaslFailure("malformed-request", "empty name or NUL in name")
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "=":
            escape = value[i + 1 : i + 3]
            if escape == "2C":
                out.append(",")
            elif escape == "3D":
                out.append("=")
            else:
                raise SaslFailure("malformed-request", "invalid '=' escape in name")
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _printable(value: str) -> bool:
    return bool(value) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in value)


def _attribute(part: str) -> tuple[str, str]:
    """Split ``x=value``; a reserved ``m=`` is fatal (RFC 5802 §5.1)."""
    if len(part) < 3 or part[1] != "=" or not ("a" <= part[0].lower() <= "z"):
        raise SaslFailure("malformed-request", "malformed attribute")
    if part[0] == "m":
        raise SaslFailure("malformed-request", "mandatory extensions are not supported")
    return part[0], part[2:]


class Scram(Mechanism):
    """RFC 5802 server; fails closed on anything outside the ABNF."""

    def __init__(
        self,
        name: str,
        *,
        bindings: ChannelBindings,
        plus_offered: bool,
        nonce: Callable[[], str] | None,
        fake_secret: bytes,
        fake_iterations: int,
    ) -> None:
        self.plus = name.endswith("-PLUS")
        super().__init__(name.removesuffix("-PLUS"), fake_secret, fake_iterations)
        self.name = name
        self.cb_type: str | None = None
        self._hash = HASHES[self._family]
        self._bindings = bindings
        self._plus_offered = plus_offered
        self._nonce_source = nonce
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._creds: ScramCredentials | None = None
        self._fake = False

    def _first(self, data: bytes) -> Step:
        text = _utf8(data)
        cbind, sep1, rest = text.partition(",")
        authz, sep2, bare = rest.partition(",")
        if not sep1 or not sep2:
            raise SaslFailure("malformed-request", "missing GS2 header")
        self._check_cbind_flag(cbind)
        if authz:
            key, value = _attribute(authz)
            if key != "a":
                raise SaslFailure("malformed-request", "malformed GS2 authzid")
            self.authzid = _saslname(value)
        parts = bare.split(",")
        if len(parts) < 2:
            raise SaslFailure("malformed-request", "expected n= and r=")
        (n_key, username), (r_key, cnonce) = _attribute(parts[0]), _attribute(parts[1])
        if n_key != "n" or r_key != "r":
            raise SaslFailure("malformed-request", "expected n= and r=")
        for extension in parts[2:]:
            _attribute(extension)  # unknown extensions are ignored, m= is not
        if not _printable(cnonce):
            raise SaslFailure("malformed-request", "invalid nonce")
        try:
            authcid = saslprep(_saslname(username), allow_unassigned=True)
        except ValueError:
            raise SaslFailure("not-authorized", "invalid username") from None
        if not authcid:
            raise SaslFailure("not-authorized", "invalid username")
        self.authcid = authcid
        self._gs2_header = text[: len(cbind) + len(authz) + 2]
        self._client_first_bare = bare
        self._nonce = cnonce + self._server_nonce()
        self._stage = _Stage.AWAIT_CREDENTIALS
        return NeedCredentials(authcid)

    def _check_cbind_flag(self, flag: str) -> None:
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not cb_name or not all(
                ch.isascii() and (ch.isalnum() or ch in ".-") for ch in cb_name
            ):
                raise SaslFailure("malformed-request", "invalid channel binding name")
            if not self.plus:
                raise SaslFailure("malformed-request", "channel binding needs a -PLUS mechanism")
            if cb_name not in self._bindings.data:
                raise SaslFailure("not-authorized", "channel-binding-not-supported")
            self.cb_type = cb_name
        elif flag in ("n", "y"):
            if self.plus:
                raise SaslFailure("malformed-request", f"{self.name} requires channel binding")
            if flag == "y" and self._plus_offered:
                # The client would have bound had it seen our -PLUS offer: a downgrade.
                raise SaslFailure("not-authorized", "server-does-support-channel-binding")
        else:
            raise SaslFailure("malformed-request", "invalid GS2 channel binding flag")

    def _server_nonce(self) -> str:
        if self._nonce_source is None:
            return base64.b64encode(os.urandom(24)).decode("ascii")
        value = self._nonce_source()
        if not _printable(value):
            raise ValueError("server nonce must be printable ASCII without ','")
        return value

    def _with_credentials(self, creds: ScramCredentials, fake: bool) -> Challenge:
        self._creds = creds
        self._fake = fake
        salt = base64.b64encode(creds.salt).decode("ascii")
        self._server_first = f"r={self._nonce},s={salt},i={creds.iterations}"
        self._stage = _Stage.AWAIT_FINAL
        return Challenge(self._server_first.encode("ascii"))

    def _final(self, data: bytes) -> Success:
        text = _utf8(data)
        parts = text.split(",")
        if len(parts) < 3:
            raise SaslFailure("malformed-request", "expected c=, r= and p=")
        attrs = [_attribute(part) for part in parts]
        if [attrs[0][0], attrs[1][0], attrs[-1][0]] != ["c", "r", "p"]:
            raise SaslFailure("malformed-request", "expected c=, r= and p=")
        cb_input = _b64decode(attrs[0][1])
        proof = _b64decode(attrs[-1][1])
        if attrs[1][1] != self._nonce:
            raise SaslFailure("not-authorized", "nonce mismatch")
        cb_data = self._bindings.data[self.cb_type] if self.cb_type else b""
        expected = self._gs2_header.encode() + cb_data
        if not hmac.compare_digest(cb_input, expected):
            raise SaslFailure("not-authorized", "channel-bindings-dont-match")
        creds = self._creds
        assert creds is not None
        self._creds = None
        if len(proof) != hashlib.new(self._hash).digest_size:
            raise SaslFailure("malformed-request", "proof has the wrong length")
        without_proof = text[: len(text) - len(parts[-1]) - 1]
        auth_message = ",".join(
            (self._client_first_bare, self._server_first, without_proof)
        ).encode()
        signature = hmac.new(creds.stored_key, auth_message, self._hash).digest()
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        stored = hashlib.new(self._hash, client_key).digest()
        if not hmac.compare_digest(stored, creds.stored_key) or self._fake:
            raise SaslFailure("not-authorized")
        verifier = hmac.new(creds.server_key, auth_message, self._hash).digest()
        return Success(b"v=" + base64.b64encode(verifier))


# ------------------------------------------------------------------ negotiation


def available_mechanisms(
    *, tls: bool, bindings: ChannelBindings, enabled: Sequence[str]
) -> list[str]:
    """The enabled mechanisms usable on this stream, in configured order.

    Names this module does not implement are skipped; validate configuration
    against :data:`SUPPORTED_MECHANISMS` at startup.
    """
    usable: list[str] = []
    for name in enabled:
        if name not in SUPPORTED_MECHANISMS or name in usable:
            continue
        if name == "PLAIN" and not tls:
            continue
        if name.endswith("-PLUS") and not bindings.data:
            continue
        usable.append(name)
    return usable


def create_mechanism(
    name: str,
    *,
    tls: bool,
    bindings: ChannelBindings,
    offered: Sequence[str],
    nonce: Callable[[], str] | None = None,
    fake_secret: bytes = PROCESS_FAKE_SECRET,
    fake_iterations: int = MIN_ITERATIONS,
) -> Mechanism:
    """Start the exchange the client picked from ``offered``.

    ``fake_secret`` should be persistent and ``fake_iterations`` the count new
    accounts get, so that made-up credentials for unknown users look real.
    """
    if name not in available_mechanisms(tls=tls, bindings=bindings, enabled=offered):
        raise SaslFailure("invalid-mechanism", f"{name[:64]!r} is not offered")
    if name == "PLAIN":
        return Plain(fake_secret, fake_iterations)
    plus_offered = any(m.endswith("-PLUS") for m in offered) and bool(bindings.data)
    return Scram(
        name,
        bindings=bindings,
        plus_offered=plus_offered,
        nonce=nonce,
        fake_secret=fake_secret,
        fake_iterations=fake_iterations,
    )
