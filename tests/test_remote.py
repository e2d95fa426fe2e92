"""Remote mode end to end: backups over a TCP replication connection to 127.0.0.1, restored,
started and compared table by table; TLS with verify-full; the least-privilege role; a password
file; a chain of a remote full and a local incremental."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict
from rig.archive import enable_archiving
from rig.drkit import Drkit, check_indexes, start_restored
from rig.postgres import PgCluster, PgFactory, chown_to_server_user, database_checksums
from rig.tls import LOOPBACK_SAN, certificate_pem, make_certificate, write_key
from test_backup_restore import LARGE_OBJECT, populate

from drkit.config.settings import PostgresSettings

MARKER = "remote-plaintext-marker-7f3a"
BACKUP_ROLE = "drkit_backup"


def listen_on_tcp(cluster: PgCluster, hba: str | None = None) -> None:
    """Make the cluster listen on 127.0.0.1:<port> (initdb's pg_hba already lets 127.0.0.1 in,
    replication included); ``hba`` replaces pg_hba.conf."""
    cluster.set_conf({"listen_addresses": "127.0.0.1"})
    if hba is not None:
        (cluster.pgdata / "pg_hba.conf").write_text(hba)
    cluster.restart()


def remote(dk: Drkit, **postgres: Any) -> None:
    """Point ``dk`` at the cluster over TCP in remote mode (no pgdata)."""
    settings = {"mode": "remote", "host": "127.0.0.1", "port": dk.cluster.port, "user": "postgres"}
    dk.write_config(postgres={**settings, **postgres})


def create_backup_role(cluster: PgCluster, replication: bool = True, password: str = "") -> None:
    """The role docs/remote.md documents: LOGIN and REPLICATION, nothing else."""
    attributes = "LOGIN REPLICATION" if replication else "LOGIN"
    if password:
        attributes += f" PASSWORD '{password}'"
    cluster.psql(f"CREATE ROLE {BACKUP_ROLE} {attributes}")


def restore_and_compare(dk: Drkit, workdir: Path, source: dict[str, Any], *args: str) -> PgCluster:
    target = workdir / "restored"
    dk.ok("restore", "--pgdata", str(target), *args)
    restored = start_restored(target, dk.cluster.version, workdir)
    assert database_checksums(restored) == source
    check_indexes(restored)
    return restored


def test_remote_full_backup_restores_identical_data(pg: PgCluster, workdir: Path) -> None:
    listen_on_tcp(pg)
    populate(pg, pg.make_tablespace_dir("fast"))
    pg.psql(f"CREATE TABLE secret AS SELECT '{MARKER}' || g AS s FROM generate_series(1, 200) g")
    create_backup_role(pg)
    # Small bundles and a low large-file threshold: bundles held in memory and large files
    # stored straight from the stream are both exercised.
    dk = Drkit(pg, workdir, backup={"bundle_limit": 64 * 1024, "bundle_size": 1024 * 1024})
    remote(dk, user=BACKUP_ROLE)
    init = dk.ok("init")
    assert "remote mode: the role may take base backups" in init.stdout
    backup = json.loads(dk.ok("backup", "--json").stdout)
    source = database_checksums(pg)
    sequence = pg.psql("SELECT last_value FROM counter")
    large_object = pg.psql(LARGE_OBJECT)
    pg.psql("UPDATE accounts SET balance = 0 WHERE id < 500; DROP TABLE small")

    assert backup["type"] == "full" and backup["stats"]["files"] > 900
    # Nothing the backup host wrote holds the data in clear
    for path in workdir.rglob("*"):
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path
    dk.ok("verify")

    ts_target = workdir / "fast-restored"
    restored = restore_and_compare(dk, workdir, source, "--tablespace-map", f"fast={ts_target}")
    assert restored.psql("SELECT last_value FROM counter") == sequence
    assert restored.psql(LARGE_OBJECT) == large_object
    assert restored.psql("SELECT count(*) FROM scratch") == "0"  # unlogged: reset
    location = restored.psql(
        "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'fast'"
    )
    assert Path(location) == ts_target
    assert restored.psql("SELECT count(*) FROM hot") == "30000"


def test_remote_full_then_local_incr_restores(pg: PgCluster, workdir: Path) -> None:
    """A remote full is a parent like any other: a local incremental on top of it restores."""
    listen_on_tcp(pg)
    populate(pg)
    dk = Drkit(pg, workdir)
    remote(dk)
    dk.ok("init")
    fallback = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert fallback["type"] == "full"
    assert "no earlier backup to base a incr backup on" in fallback["notice"]

    pg.psql("UPDATE accounts SET balance = balance + 1 WHERE id % 97 = 0")
    pg.psql("INSERT INTO accounts SELECT g, 'new', 1, '' FROM generate_series(200001, 201000) g")
    dk.write_config()  # local mode, on the database host
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr" and incr["parent"] == fallback["label"]
    source = database_checksums(pg)
    restore_and_compare(dk, workdir, source)


def test_remote_refuses_a_role_without_replication(pg: PgCluster, workdir: Path) -> None:
    listen_on_tcp(pg)
    create_backup_role(pg, replication=False)
    dk = Drkit(pg, workdir)
    remote(dk, user=BACKUP_ROLE)
    result = dk.run("init")
    assert result.exit_code == 41, result.output
    assert "lacks what remote backups need" in result.output
    assert "the REPLICATION attribute" in result.output
    assert "HINT: docs/remote.md" in result.output
    assert not dk.repo_path.exists()  # nothing created

    pg.psql("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    pg.psql(f"ALTER ROLE {BACKUP_ROLE} REPLICATION")
    result = dk.run("init")
    assert result.exit_code == 41, result.output
    assert "EXECUTE on function pg_control_system()" in result.output
    assert "REPLICATION attribute" not in result.output

    pg.psql(f"GRANT EXECUTE ON FUNCTION pg_control_system() TO {BACKUP_ROLE}")
    dk.ok("init")
    assert json.loads(dk.ok("backup", "--json").stdout)["type"] == "full"


def test_remote_password_file_must_be_private(pg: PgCluster, workdir: Path) -> None:
    hba = (
        "local all all trust\n"
        "host all postgres 127.0.0.1/32 trust\n"
        f"host all {BACKUP_ROLE} 127.0.0.1/32 scram-sha-256\n"
        f"host replication {BACKUP_ROLE} 127.0.0.1/32 scram-sha-256\n"
    )
    listen_on_tcp(pg, hba)
    create_backup_role(pg, password="s3cret-pw")
    passfile = workdir / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg.port}:*:{BACKUP_ROLE}:s3cret-pw\n")
    passfile.chmod(0o644)
    dk = Drkit(pg, workdir)
    remote(dk, user=BACKUP_ROLE, passfile=passfile)
    result = dk.run("init")
    assert result.exit_code == 45, result.output
    assert f"password file '{passfile}' is readable by others (mode 0644)" in result.output
    assert f"HINT: chmod 600 '{passfile}'" in result.output

    passfile.chmod(0o600)
    dk.ok("init")
    backup = dk.ok("backup")
    assert "s3cret-pw" not in backup.output


def _certificates(directory: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, a server certificate it signed for 127.0.0.1 (key and chain), and an unrelated CA."""
    ca_key, ca = make_certificate("drkit test CA")
    server_key, server = make_certificate("127.0.0.1", (ca.subject, ca_key), LOOPBACK_SAN)
    _, other_ca = make_certificate("another CA")
    paths = [directory / n for n in ("ca.crt", "server.crt", "server.key", "other-ca.crt")]
    paths[0].write_bytes(certificate_pem(ca))
    paths[1].write_bytes(certificate_pem(server))
    write_key(paths[2], server_key)
    paths[3].write_bytes(certificate_pem(other_ca))
    return paths[0], paths[1], paths[2], paths[3]


def test_remote_tls_verify_full(pg_factory: PgFactory, workdir: Path) -> None:
    """The Debian build of 15 has OpenSSL (the PyPI build of 18 has not): TLS only, verify-full
    against the CA that signed the server's certificate; another CA is refused, clearly."""
    pg = pg_factory(15)
    tls_dir = pg.base_dir / "tls"
    tls_dir.mkdir(mode=0o700)
    ca, cert, key, other_ca = _certificates(tls_dir)
    key.chmod(0o600)
    chown_to_server_user(tls_dir, recursive=True)
    pg.set_conf({"ssl": True, "ssl_cert_file": str(cert), "ssl_key_file": str(key)})
    hba = (
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 trust\n"
        "hostssl replication all 127.0.0.1/32 trust\n"
    )
    listen_on_tcp(pg, hba)
    populate(pg)
    dk = Drkit(pg, workdir)

    remote(dk, sslmode="disable")
    refused = dk.run("init")  # the server takes TLS connections only
    assert refused.exit_code == 4, refused.output

    remote(dk, sslmode="verify-full", sslrootcert=other_ca)
    wrong = dk.run("init")
    assert wrong.exit_code == 42, wrong.output
    assert "TLS to PostgreSQL failed" in wrong.output and "certificate" in wrong.output
    assert "HINT: postgres.sslrootcert must hold the CA" in wrong.output

    remote(dk, sslmode="verify-full", sslrootcert=ca)
    assert "sslmode=verify-full" in dk.ok("init").stdout
    dk.ok("backup")
    source = database_checksums(pg)
    restore_and_compare(dk, workdir, source)


def test_remote_mode_needs_no_pgdata_but_local_mode_does(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.write_config(postgres={"host": "127.0.0.1", "port": pg.port})
    result = dk.run("init")
    assert result.exit_code == 3, result.output
    assert "postgres.pgdata is required in local mode" in result.output


def test_remote_check_names_its_grants_then_archives(pg: PgCluster, workdir: Path) -> None:
    """`drkit check` from the backup host: the WAL switch it needs is superuser-only unless
    granted, and it says so; granted, the segment arrives through archive_command (which runs
    on the server, here with the same configuration: wal-push needs no pgdata either)."""
    create_backup_role(pg)
    listen_on_tcp(pg)
    dk = Drkit(pg, workdir)
    remote(dk, user=BACKUP_ROLE)
    dk.ok("init")
    postgres = {"mode": "remote", "host": "127.0.0.1", "port": pg.port, "user": BACKUP_ROLE}
    enable_archiving(pg, dk, sections={"postgres": postgres})

    result = dk.run("check")
    assert result.exit_code == 41, result.output
    assert "EXECUTE on function pg_create_restore_point(text)" in result.output
    assert "EXECUTE on function pg_switch_wal()" in result.output

    pg.psql(
        f"GRANT EXECUTE ON FUNCTION pg_create_restore_point(text), pg_switch_wal() TO {BACKUP_ROLE}"
    )
    checked = dk.ok("check", "--json")
    assert json.loads(checked.stdout)["repositories"]["local"] is not None


def test_remote_mode_refuses_postgresql_before_15(pg_factory: PgFactory, workdir: Path) -> None:
    pg = pg_factory(14)
    listen_on_tcp(pg)
    dk = Drkit(pg, workdir)
    remote(dk)
    result = dk.run("init")
    assert result.exit_code == 46, result.output
    assert "remote backups need PostgreSQL 15 or later; the server runs 14" in result.output
    assert "HINT: run drkit in local mode on the database host" in result.output
    assert dk.repo_listing() == {}  # nothing created


def test_remote_backup_killed_midway_leaves_nothing_behind(pg: PgCluster, workdir: Path) -> None:
    """kill -9 while the base backup streams: no backup is listed, the server drops the slot and
    the sender with the connection, and the next backup succeeds and restores."""
    listen_on_tcp(pg)
    pg.run_bin("pgbench", "-i", "-s", "10", "-q")
    dk = Drkit(pg, workdir, backup={"process_max": 1})
    remote(dk)
    dk.ok("init")
    proc = dk.spawn("backup")
    try:
        deadline = time.monotonic() + 120
        while not list((dk.repo_path / "backup").rglob("*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the backup stored nothing within 120 s"
            time.sleep(0.01)
        assert proc.poll() is None, "the backup ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert dk.info()["backups"] == []
    deadline = time.monotonic() + 30
    while (
        pg.psql("SELECT count(*) FROM pg_replication_slots") != "0"
        or pg.psql("SELECT count(*) FROM pg_stat_replication") != "0"
    ):
        assert time.monotonic() < deadline, "the killed backup's slot or sender is still there"
        time.sleep(0.05)

    backup = json.loads(dk.ok("backup", "--json").stdout)
    assert [b["label"] for b in dk.info()["backups"]] == [backup["label"]]
    restore_and_compare(dk, workdir, database_checksums(pg))


def test_tls_settings_reach_libpq_with_a_dsn_too() -> None:
    """sslmode, sslrootcert and passfile are added to a key=value dsn and to a URI alike, as
    libpq itself parses them (a path with spaces, '&' and '+' included)."""
    odd = "/etc/drkit/a b&c+d.crt"
    for dsn in ("host=db.internal user=drkit_backup", "postgresql://drkit_backup@db.internal/x"):
        settings = PostgresSettings(
            mode="remote", dsn=dsn, sslmode="verify-full", sslrootcert=odd, passfile="/p w"
        )
        parsed = conninfo_to_dict(settings.conninfo())
        assert parsed["host"] == "db.internal" and parsed["user"] == "drkit_backup"
        assert (parsed["sslmode"], parsed["sslrootcert"], parsed["passfile"]) == (
            "verify-full",
            odd,
            "/p w",
        )
