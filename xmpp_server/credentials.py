"""SCRAM credentials as stored for an account (RFC 5802 §3): never the password itself."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
MIN_ITERATIONS = 4096


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """StoredKey/ServerKey for one SCRAM family; enough to verify, useless to log in with."""

    mechanism: str  # "SCRAM-SHA-1" or "SCRAM-SHA-256" (the family, never the -PLUS name)
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def salted_password(mechanism: str, password: str, salt: bytes, iterations: int) -> bytes:
    """Hi(Normalize(password), salt, i); ``password`` must already be SASLprepped."""
    return hashlib.pbkdf2_hmac(HASHES[mechanism], password.encode(), salt, iterations)


def credentials_from_salted(
    mechanism: str, salted: bytes, salt: bytes, iterations: int
) -> ScramCredentials:
    name = HASHES[mechanism]
    client_key = hmac.new(salted, b"Client Key", name).digest()
    server_key = hmac.new(salted, b"Server Key", name).digest()
    stored_key = hashlib.new(name, client_key).digest()
    return ScramCredentials(mechanism, salt, iterations, stored_key, server_key)


def derive_credentials(
    mechanism: str, password: str, iterations: int, salt: bytes | None = None
) -> ScramCredentials:
    """Derive credentials for a (SASLprepped) password with a fresh random salt."""
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"SCRAM iterations must be at least {MIN_ITERATIONS}")
    salt = salt if salt is not None else os.urandom(16)
    return credentials_from_salted(
        mechanism, salted_password(mechanism, password, salt, iterations), salt, iterations
    )
