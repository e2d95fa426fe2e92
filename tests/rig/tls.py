"""Throwaway X.509 certificates for tests: a CA, certificates it signs, PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK_SAN = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))


def make_certificate(
    name: str, issuer: tuple[x509.Name, Any] | None = None, san: x509.GeneralName | None = None
) -> tuple[Any, x509.Certificate]:
    """A new EC key and a certificate for ``name``, valid for a day: a CA of its own when
    ``issuer`` (its name and key) is None, else signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: Path, key: Any) -> None:
    """The private key as unencrypted PKCS#8 PEM, mode 0600 (libpq refuses a looser one)."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
