"""TLS: a self-signed certificate on first start, and the server-side SSL context.

A fresh install must be able to offer STARTTLS (``c2s.require_tls`` defaults to true) before
anyone has obtained a real certificate, so we generate one for the domain under the data
directory. Certificates the operator configured are never generated or replaced.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xmpp_server.config import Config, ConfigError

ALPN_XMPP_CLIENT = "xmpp-client"  # XEP-0368
_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _san(name: str) -> x509.GeneralName:
    """IP-literal domains (``127.0.0.1``, ``[::1]``) need an iPAddress entry, not a dNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
    except ValueError:
        return x509.DNSName(name)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file so a crash never leaves a half-written key or certificate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_self_signed(
    cert_path: Path, key_path: Path, hostnames: Sequence[str], days: int = 825
) -> None:
    """Write an EC P-256 key (mode 0600) and a self-signed certificate for ``hostnames``.

    825 days is the longest validity Apple clients accept for a TLS server certificate.
    """
    names = list(dict.fromkeys(hostnames))
    if not names:
        raise ValueError("a certificate needs at least one hostname")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate client clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(  # Python 3.13's strict verification wants it even when self-signed
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a certificate without its key is worse than no certificate.
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_certificate(config: Config) -> tuple[Path, Path]:
    """Return the certificate and key paths, generating the default pair if it is missing."""
    cert_path, key_path = config.cert_path, config.key_path
    if config.tls_configured:
        for path, key in ((cert_path, "tls.cert_file"), (key_path, "tls.key_file")):
            if not path.is_file():
                raise config.explain(ConfigError(f"file not found: {path}", key))
        return cert_path, key_path
    if not (cert_path.is_file() and key_path.is_file()):
        generate_self_signed(cert_path, key_path, [config.server.domain])
    return cert_path, key_path


# Ciphertext read per recv() and plaintext per SSLObject.read(), allocated per connection.
# 8 KiB holds any chat stanza's record; a full 16 KiB record (RFC 8446 §5.2) takes two reads,
# which only bulk transfers (uploads) see. 16,645 bytes here was 8 KiB more per idle session.
TLS_READ_BUFFER = 8192


def limit_asyncio_tls_buffers() -> None:
    """Cap the receive buffer asyncio allocates (and zero-fills) for every TLS connection.

    ``asyncio.sslproto.SSLProtocol`` reads from the socket into a ``bytearray(max_size)``
    made when the connection is accepted, 256 KiB by default: with thousands of idle
    sessions that buffer alone is most of the server's memory (342 KiB of RSS per idle
    session was measured, against ejabberd's ~51 KiB). Smaller reads cost a few more
    ``recv`` calls on bulk uploads and nothing on chat traffic.
    """
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def server_context(cert_path: Path, key_path: Path, min_version: str) -> ssl.SSLContext:
    """A server context for STARTTLS and direct TLS; clients are not asked for certificates."""
    try:
        version = _TLS_VERSIONS[min_version]
    except KeyError:
        raise ConfigError(
            f"expected one of {', '.join(_TLS_VERSIONS)}, got {min_version!r}", "tls.min_version"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = version
    context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load certificate {cert_path} with key {key_path}: {exc}", "tls.cert_file"
        ) from None
    context.set_alpn_protocols([ALPN_XMPP_CLIENT])
    return context


def certificate_der(cert_path: Path) -> bytes:
    """The first certificate of a PEM file in DER, as tls-server-end-point binding hashes it."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)
