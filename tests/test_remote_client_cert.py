"""Remote mode with a TLS client certificate instead of a password (pg_hba.conf's `cert`
method): `[postgres] sslcert` and `sslkey` reach libpq, for the SQL session and the replication
connection alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography import x509
from rig.drkit import Drkit
from rig.postgres import PgFactory, chown_to_server_user
from rig.tls import LOOPBACK_SAN, certificate_pem, make_certificate, write_key
from test_remote import BACKUP_ROLE, create_backup_role, listen_on_tcp, remote


def _issue(directory: Path) -> dict[str, Path]:
    """A CA, and two certificates it signed: the server's (for 127.0.0.1) and the role's."""
    written: dict[str, Path] = {}

    def save(name: str, key: Any, cert: x509.Certificate) -> None:
        written[f"{name}.crt"] = directory / f"{name}.crt"
        written[f"{name}.crt"].write_bytes(certificate_pem(cert))
        written[f"{name}.key"] = directory / f"{name}.key"
        write_key(written[f"{name}.key"], key)

    ca_key, ca = make_certificate("drkit test CA")
    save("ca", ca_key, ca)
    save("server", *make_certificate("127.0.0.1", (ca.subject, ca_key), LOOPBACK_SAN))
    save("client", *make_certificate(BACKUP_ROLE, (ca.subject, ca_key)))
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
