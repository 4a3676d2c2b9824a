"""Self-signed certificate generation and the server SSL context."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from xmpp_server.config import Config, ConfigError, load_config
from xmpp_server.tls import (
    certificate_der,
    ensure_certificate,
    generate_self_signed,
    server_context,
)


def make_config(tmp_path: Path, text: str = "") -> Config:
    path = tmp_path / "natterd.toml"
    path.write_text('[server]\ndomain = "example.org"\n' + text)
    return load_config(path, env={})


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generated_certificate_has_the_names_and_a_private_key(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "a" / "b" / "cert.pem", tmp_path / "keys" / "key.pem"
    generate_self_signed(cert_path, key_path, ["example.org", "localhost", "127.0.0.1", "[::1]"])
    cert = load_cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not list(key_path.parent.glob(".*"))  # no temporary files left behind
    assert cert.not_valid_after_utc > cert.not_valid_before_utc
    context = server_context(cert_path, key_path, "1.2")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_regenerating_replaces_a_group_readable_key_with_0600(tmp_path: Path) -> None:
    key_path = tmp_path / "key.pem"
    key_path.write_text("old")
    key_path.chmod(0o644)
    generate_self_signed(tmp_path / "cert.pem", key_path, ["example.org"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_server_context_minimum_version_1_3(tmp_path: Path) -> None:
    generate_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", ["example.org"])
    assert server_context(tmp_path / "c.pem", tmp_path / "k.pem", "1.3").minimum_version == (
        ssl.TLSVersion.TLSv1_3
    )


def test_server_context_rejects_a_key_that_does_not_match(tmp_path: Path) -> None:
    generate_self_signed(tmp_path / "a.pem", tmp_path / "a.key", ["a.example"])
    generate_self_signed(tmp_path / "b.pem", tmp_path / "b.key", ["b.example"])
    with pytest.raises(ConfigError, match="^tls.cert_file: cannot load certificate"):
        server_context(tmp_path / "a.pem", tmp_path / "b.key", "1.2")


def test_certificate_der_is_the_first_certificate(tmp_path: Path) -> None:
    generate_self_signed(tmp_path / "a.pem", tmp_path / "a.key", ["a.example"])
    generate_self_signed(tmp_path / "b.pem", tmp_path / "b.key", ["b.example"])
    chain = tmp_path / "chain.pem"
    chain.write_bytes((tmp_path / "a.pem").read_bytes() + (tmp_path / "b.pem").read_bytes())
    der = certificate_der(chain)
    assert x509.load_der_x509_certificate(der) == load_cert(tmp_path / "a.pem")


def test_ensure_certificate_generates_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    cert_path, key_path = ensure_certificate(config)
    assert (cert_path, key_path) == (
        tmp_path / "data" / "tls" / "example.org.crt",
        tmp_path / "data" / "tls" / "example.org.key",
    )
    first = cert_path.read_bytes()
    names = load_cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["example.org"]
    assert ensure_certificate(config) == (cert_path, key_path)
    assert cert_path.read_bytes() == first


def test_ensure_certificate_regenerates_a_lone_certificate(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    cert_path, key_path = ensure_certificate(config)
    key_path.unlink()
    ensure_certificate(config)
    server_context(cert_path, key_path, "1.2")  # the pair matches again


def test_ensure_certificate_never_generates_configured_files(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[tls]\ncert_file = "my.crt"\nkey_file = "my.key"\n')
    with pytest.raises(ConfigError, match=r"^tls.cert_file: file not found: .*my\.crt$"):
        ensure_certificate(config)
    assert not (tmp_path / "my.crt").exists()
    generate_self_signed(tmp_path / "my.crt", tmp_path / "my.key", ["example.org"])
    assert ensure_certificate(config) == (tmp_path / "my.crt", tmp_path / "my.key")


async def test_client_completes_a_handshake_with_alpn(tmp_path: Path) -> None:
    cert_path, key_path = ensure_certificate(make_config(tmp_path))
    server_ctx = server_context(cert_path, key_path, "1.2")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    client_ctx.set_alpn_protocols(["xmpp-client"])
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="example.org"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "xmpp-client"
        assert await reader.read() == b"hello"
        writer.close()
