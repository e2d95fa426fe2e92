"""Remote mode with a TLS client certificate instead of a password (pg_hba.conf's `cert`
method): `[postgres] sslcert` and `sslkey` reach libpq, for the SQL session and the replication
connection alike."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rig.drkit import Drkit
from rig.postgres import PgFactory, chown_to_server_user
from test_remote import BACKUP_ROLE, create_backup_role, listen_on_tcp, remote


def _issue(directory: Path) -> dict[str, Path]:
    """A CA, and two certificates it signed: the server's (for 127.0.0.1) and the role's."""
    now = datetime.datetime.now(datetime.UTC)
    written: dict[str, Path] = {}

    def make(name: str, issuer: tuple[Any, Any] | None, san: x509.GeneralName | None) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = issuer if issuer else (subject, key)
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

    def save(name: str, key: Any, cert: Any) -> None:
        written[f"{name}.crt"] = directory / f"{name}.crt"
        written[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written[f"{name}.key"] = directory / f"{name}.key"
        written[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        written[f"{name}.key"].chmod(0o600)

    ca_key, ca = make("drkit test CA", None, None)
    save("ca", ca_key, ca)
    server = make(
        "127.0.0.1", (ca.subject, ca_key), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    save("server", *server)
    save("client", *make(BACKUP_ROLE, (ca.subject, ca_key), None))
    return written


def test_remote_backup_with_a_client_certificate(pg_factory: PgFactory, workdir: Path) -> None:
    """The Debian build of 15 has OpenSSL (the PyPI build of 18 has not). The role has no
    password: without the certificate the server refuses it, with it init and a backup run."""
    pg = pg_factory(15)
    tls_dir = pg.base_dir / "tls"
    tls_dir.mkdir(mode=0o700)
    files = _issue(tls_dir)
    chown_to_server_user(tls_dir, recursive=True)
    pg.set_conf(
        {
            "ssl": True,
            "ssl_cert_file": str(files["server.crt"]),
            "ssl_key_file": str(files["server.key"]),
            "ssl_ca_file": str(files["ca.crt"]),  # the CA client certificates must chain to
        }
    )
    hba = (
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 cert\n"
        "hostssl replication all 127.0.0.1/32 cert\n"
    )
    listen_on_tcp(pg, hba)
    create_backup_role(pg)
    client_dir = workdir / "client"  # drkit's copy, as this process's user
    client_dir.mkdir(mode=0o700)
    cert, key = client_dir / "client.crt", client_dir / "client.key"
    cert.write_bytes(files["client.crt"].read_bytes())
    key.write_bytes(files["client.key"].read_bytes())
    key.chmod(0o600)
    dk = Drkit(pg, workdir)
    tls = {"sslmode": "verify-full", "sslrootcert": files["ca.crt"]}

    remote(dk, user=BACKUP_ROLE, **tls)
    refused = dk.run("init")
    assert refused.exit_code == 42, refused.output
    assert "TLS to PostgreSQL failed" in refused.output
    assert "HINT: the server wants a client certificate: set postgres.sslcert" in refused.output

    remote(dk, user=BACKUP_ROLE, sslcert=cert, sslkey=key, **tls)
    dk.ok("init")
    backup = json.loads(dk.ok("backup", "--json").stdout)
    assert [b["label"] for b in dk.info()["backups"]] == [backup["label"]]
