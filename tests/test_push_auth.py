"""The push gateway's credentials: JWTs checked with the public key the way Google and Apple
check them, and token caches driven by a fake clock."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from xmpp_server.config import ConfigError, PushGatewayConfig, build_config
from xmpp_server.push_auth import (
    FCM_SCOPE,
    JWT_BEARER_GRANT,
    AccessTokenCache,
    ProviderTokenCache,
    ServiceAccount,
    apns_provider_token,
    fcm_assertion,
    load_apns_key,
    parse_token_response,
    sign_jwt,
    token_request,
)
from xmpp_server.pushgate import Credentials

NOW = 1_800_000_000.0
EMAIL = "natter-push@natter-test.iam.gserviceaccount.com"


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(
    token: str, public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, claims)`` of a compact JWS whose signature ``public_key`` verifies, as the
    receiving service does it (written from RFC 7515/7518, independently of push_auth)."""
    head, body, signature = token.split(".")
    header, claims = json.loads(_b64decode(head)), json.loads(_b64decode(body))
    data, raw = f"{head}.{body}".encode(), _b64decode(signature)
    if isinstance(public_key, rsa.RSAPublicKey):
        assert header["alg"] == "RS256"
        public_key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert header["alg"] == "ES256"
        assert len(raw) == 64  # r || s, 32 bytes each, not DER
        der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    return header, claims


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def service_account_json(key: rsa.RSAPrivateKey, token_uri: str, project: str) -> str:
    """A key file shaped like the one the Google Cloud console downloads."""
    return json.dumps(
        {
            "type": "service_account",
            "project_id": project,
            "private_key_id": "0123abcd",
            "private_key": pem(key),
            "client_email": EMAIL,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }
    )


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------------------- JWTs


def test_rs256_jwt_verifies_with_the_public_key() -> None:
    key = rsa_key()
    token = sign_jwt({"iss": "me", "n": 1}, key, {"typ": "JWT"})
    header, claims = verify_jwt(token, key.public_key())
    assert header == {"alg": "RS256", "typ": "JWT"}
    assert claims == {"iss": "me", "n": 1}
    assert "=" not in token  # base64url without padding

    head, body, signature = token.split(".")
    forged = sign_jwt({"iss": "me", "n": 2}, key).split(".")[1]
    with pytest.raises(InvalidSignature):
        verify_jwt(f"{head}.{forged}.{signature}", key.public_key())
    with pytest.raises(InvalidSignature):
        verify_jwt(token, rsa_key().public_key())


def test_es256_jwt_signature_is_raw_r_and_s() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # ECDSA signatures are random and r or s often has a leading zero byte: sign many times
    # so that the fixed-width encoding of short integers is exercised too.
    for i in range(40):
        header, claims = verify_jwt(sign_jwt({"i": i}, key, {"kid": "K"}), key.public_key())
        assert header == {"alg": "ES256", "kid": "K"} and claims == {"i": i}
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidSignature):
        verify_jwt(sign_jwt({}, key), other.public_key())


def test_other_keys_cannot_sign() -> None:
    with pytest.raises(TypeError):
        sign_jwt({}, ec.generate_private_key(ec.SECP384R1()))


def test_fcm_assertion_claims() -> None:
    key = rsa_key()
    account = ServiceAccount.from_json(
        service_account_json(key, "https://oauth2.example/token", "natter-test")
    )
    assert (account.client_email, account.project_id) == (EMAIL, "natter-test")
    header, claims = verify_jwt(fcm_assertion(account, NOW + 0.7), key.public_key())
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "0123abcd"}
    assert claims == {
        "iss": EMAIL,
        "scope": FCM_SCOPE,
        "aud": "https://oauth2.example/token",
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
    }
    form = token_request(account, NOW)
    assert form["grant_type"] == JWT_BEARER_GRANT == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert verify_jwt(form["assertion"], key.public_key())[1]["iat"] == int(NOW)


def test_apns_provider_token_claims() -> None:
    key = load_apns_key(pem(ec.generate_private_key(ec.SECP256R1())).encode())
    header, claims = verify_jwt(
        apns_provider_token(key, "ABC123DEFG", "TEAM4567", NOW), key.public_key()
    )
    assert header == {"alg": "ES256", "kid": "ABC123DEFG"}
    assert claims == {"iss": "TEAM4567", "iat": int(NOW)}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"private_key": "x"}', "no 'client_email'"),
        ('{"client_email": "a@b", "private_key": "nope"}', "not a PEM private key"),
    ],
)
def test_bad_service_account_files_say_why(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ServiceAccount.from_json(text)


def test_service_account_needs_an_rsa_key() -> None:
    ec_pem = pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match="not an RSA key"):
        ServiceAccount.from_json(json.dumps({"client_email": "a@b", "private_key": ec_pem}))
    with pytest.raises(ValueError, match="not an EC P-256 key"):
        load_apns_key(pem(rsa_key()).encode())


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([], "not a JSON object"),
        ({"expires_in": 3599}, "no access_token"),
        ({"access_token": "t", "expires_in": 0}, "bad expires_in"),
        ({"access_token": "t", "expires_in": "soon"}, "bad expires_in"),
    ],
)
def test_bad_token_responses_say_why(body: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_token_response(body)


def test_token_response() -> None:
    assert parse_token_response({"access_token": "ya29.x", "expires_in": 3599}) == ("ya29.x", 3599)


# ------------------------------------------------------------------------------------- caches


def test_access_token_is_refreshed_five_minutes_before_it_expires() -> None:
    clock = FakeClock()
    cache = AccessTokenCache(clock)
    assert cache.current() is None
    cache.store("one", 3600)
    clock.now += 3600 - 300 - 1
    assert cache.current() == "one"
    clock.now += 1
    assert cache.current() is None


def test_short_lived_access_token_is_used_for_half_its_life() -> None:
    clock = FakeClock()
    cache = AccessTokenCache(clock)
    cache.store("short", 60)
    clock.now += 29.9
    assert cache.current() == "short"
    clock.now += 0.1
    assert cache.current() is None


def test_refused_access_token_is_forgotten_once() -> None:
    cache = AccessTokenCache(FakeClock())
    cache.store("old", 3600)
    cache.invalidate("old")
    assert cache.current() is None
    cache.store("new", 3600)
    cache.invalidate("old")  # a late 401 for the old token must not drop the new one
    assert cache.current() == "new"


def test_provider_token_is_reused_for_fifty_minutes() -> None:
    clock = FakeClock()
    key = ec.generate_private_key(ec.SECP256R1())
    cache = ProviderTokenCache(key, "KID", "TEAM", clock)
    first = cache.token()
    clock.now += 50 * 60 - 1
    assert cache.token() == first
    clock.now += 1
    second = cache.token()
    assert second != first
    assert verify_jwt(second, key.public_key())[1] == {"iss": "TEAM", "iat": int(NOW) + 3000}

    cache.expired(first)  # an answer to a token already replaced changes nothing
    assert cache.token() == second
    cache.expired(second)
    third = cache.token()
    assert third != second
    verify_jwt(third, key.public_key())


# ------------------------------------------------------------------------------ configuration


def test_key_files_are_relative_to_the_config_file(tmp_path: Path) -> None:
    data = {
        "pushgate": {
            "fcm_service_account": "keys/google.json",
            "apns_key_file": "/etc/natter/AuthKey.p8",
            "apns_key_id": "KID",
            "apns_team_id": "TEAM",
        }
    }
    config = build_config(data, base_dir=tmp_path).pushgate
    assert config.fcm_service_account == str(tmp_path / "keys" / "google.json")
    assert config.apns_key_file == "/etc/natter/AuthKey.p8"
    assert build_config({}, base_dir=tmp_path).pushgate == PushGatewayConfig()


@pytest.mark.parametrize("missing", ["apns_key_id", "apns_team_id"])
def test_apns_key_needs_its_id_and_team(tmp_path: Path, missing: str) -> None:
    table = {"apns_key_file": "k.p8", "apns_key_id": "KID", "apns_team_id": "TEAM"}
    del table[missing]
    with pytest.raises(ConfigError, match=f"pushgate.{missing}: must be set"):
        build_config({"pushgate": table}, base_dir=tmp_path)


def test_unreadable_or_wrong_key_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pushgate.fcm_service_account: cannot read"):
        Credentials.load(PushGatewayConfig(fcm_service_account=str(tmp_path / "none.json")))
    wrong = tmp_path / "AuthKey.p8"
    wrong.write_text(pem(rsa_key()))
    config = PushGatewayConfig(apns_key_file=str(wrong), apns_key_id="K", apns_team_id="T")
    with pytest.raises(ConfigError, match=r"pushgate.apns_key_file: .*not an EC P-256 key"):
        Credentials.load(config)


def test_project_comes_from_the_service_account_unless_configured(tmp_path: Path) -> None:
    file = tmp_path / "google.json"
    file.write_text(service_account_json(rsa_key(), "https://oauth2.example/token", "from-file"))
    config = PushGatewayConfig(fcm_service_account=str(file))
    assert Credentials.load(config).fcm_project == "from-file"
    config = PushGatewayConfig(fcm_service_account=str(file), fcm_project="configured")
    assert Credentials.load(config).fcm_project == "configured"
