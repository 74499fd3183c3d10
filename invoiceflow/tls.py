"""A private certificate authority and a loopback server certificate for the stack's TLS.

The production stack terminates TLS at haproxy. Clients trust the generated CA through
PREFECT_API_SSL_CERT_FILE (Prefect's client) and AWS_CA_BUNDLE-like settings; nothing
outside the state directory is touched. Uses the `cryptography` package (a dependency
of Prefect), so no openssl CLI is needed.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # what clients trust
    server_pem: Path  # certificate + key in one file, the way haproxy's `crt` wants it


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "invoiceflow local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def ensure_certificates(directory: Path) -> TlsFiles:
    """Create the CA and a certificate for 127.0.0.1/localhost unless both exist."""
    files = TlsFiles(directory / "ca.pem", directory / "server.pem")
    if files.ca_cert.exists() and files.server_pem.exists():
        return files
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        _builder("invoiceflow local CA", "invoiceflow local CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert = (
        _builder("127.0.0.1", "invoiceflow local CA", server_key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files.server_pem.write_bytes(server_cert.public_bytes(pem) + _pem_key(server_key))
    files.server_pem.chmod(0o600)
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    return files
