"""The rig itself works: real clusters on each version, data checksums, S3 and Vault servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.postgres import (
    PgCluster,
    PgError,
    PgFactory,
    attach_cluster,
    database_checksums,
    table_checksums,
)
from rig.servers import OpenBaoServer, S3Server, VaultServer

# -- PostgreSQL ----------------------------------------------------------------------------------


def test_cluster_runs_the_requested_version(pg: PgCluster) -> None:
    assert pg.is_running()
    assert pg.psql("SHOW server_version").split(".")[0] == str(pg.version)
    assert pg.psql("SHOW data_checksums") == "on"
    assert pg.psql("SHOW wal_level") == "replica"
    assert pg.psql("SHOW listen_addresses") == ""
    assert pg.psql("SHOW server_encoding") == "UTF8"
    collation = "SELECT datcollate FROM pg_database WHERE datname = current_database()"
    assert pg.psql(collation) == "C.UTF-8"
    assert pg.psql("SHOW port") == str(pg.port)
    assert (pg.socket_dir / f".s.PGSQL.{pg.port}").is_socket()
    assert pg.psql("SELECT current_user") == "postgres"
    # Clients and pg_* tools are pointed at the cluster by run_bin's environment.
    controldata = pg.run_bin("pg_controldata").stdout
    assert "in production" in controldata


def test_psql_runs_scripts_and_reports_errors(pg: PgCluster) -> None:
    # A multi-statement script is not one transaction: CREATE DATABASE works inside it.
    pg.psql("CREATE DATABASE app; CREATE TABLE t (a int); INSERT INTO t VALUES (1), (2);")
    assert pg.psql("SELECT a FROM t ORDER BY a") == "1\n2"
    assert "app" in pg.psql("SELECT datname FROM pg_database").splitlines()
    with pytest.raises(PgError, match="does_not_exist"):
        pg.psql("SELECT 1; SELECT * FROM does_not_exist; SELECT 2")


def test_dsn_works_with_psycopg(pg: PgCluster) -> None:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    assert row == (pg.version,)


def test_clones_are_distinct_clusters(pg: PgCluster, pg_factory: PgFactory) -> None:
    other = pg_factory(pg.version)
    sysid = "SELECT system_identifier FROM pg_control_system()"
    assert pg.psql(sysid) != other.psql(sysid)
    assert pg.port != other.port and pg.base_dir != other.base_dir


def test_stop_start_keeps_data(pg: PgCluster) -> None:
    pg.psql("CREATE TABLE kept AS SELECT g FROM generate_series(1, 100) g")
    pg.stop("immediate")  # crash: recovery must replay the WAL
    assert not pg.is_running()
    pg.start()
    assert pg.psql("SELECT count(*) FROM kept") == "100"


def test_conf_overrides_and_tablespaces(pg: PgCluster, pg_factory: PgFactory) -> None:
    conf = {"work_mem": "8MB", "archive_mode": "on", "archive_command": "/bin/true"}
    configured = pg_factory(pg.version, conf)
    assert configured.psql("SHOW work_mem") == "8MB"
    assert configured.psql("SHOW archive_mode") == "on"
    pg.set_conf({"work_mem": "3MB"})
    pg.reload()
    assert pg.psql("SHOW work_mem") == "3MB"
    location = pg.make_tablespace_dir("ts1")
    pg.psql(f"CREATE TABLESPACE ts1 LOCATION '{location}'")
    pg.psql("CREATE TABLE in_ts TABLESPACE ts1 AS SELECT 1 AS a")
    assert pg.psql("SELECT spcname FROM pg_tablespace WHERE spcname = 'ts1'") == "ts1"
    assert "public.in_ts" in table_checksums(pg, "postgres")


def test_checksums_match_for_identical_copy_and_differ_after_update(
    pg: PgCluster, rig_root: Path, workdir: Path
) -> None:
    pg.psql(
        """
        CREATE DATABASE shop;
        CREATE TABLE public.items AS
            SELECT g AS id, md5(g::text) AS name FROM generate_series(1, 500) g;
        CREATE UNLOGGED TABLE scratch (a int);
        INSERT INTO scratch VALUES (1);
        CREATE TABLE "It's Odd" (v text);
        INSERT INTO "It's Odd" VALUES ('x|y'), (NULL);
        """
    )
    pg.psql("CREATE SCHEMA s; CREATE TABLE s.empty (a int);", dbname="shop")
    pg.run_bin("pgbench", "-i", "-s", "1", "-q", "shop")
    source = database_checksums(pg)
    assert set(source) == {"postgres", "shop"}
    assert source["postgres"]["public.items"].startswith("500:")
    assert "public.scratch" not in source["postgres"]  # unlogged: empty after any restore
    assert source["postgres"]['public."It\'s Odd"'].startswith("2:")
    assert source["shop"]["s.empty"].startswith("0:")
    assert source["shop"]["public.pgbench_accounts"].startswith("100000:")

    # A byte-for-byte copy of the stopped cluster, started next to the original.
    pg.stop()
    copy_dir = workdir / "copy"
    subprocess.run(["cp", "-a", str(pg.pgdata), str(copy_dir)], check=True)
    pg.start()
    copy = attach_cluster(copy_dir, pg.version, rig_root)
    try:
        copy.start()
        assert database_checksums(copy) == source
        copy.psql("UPDATE items SET name = 'changed' WHERE id = 42")
        changed = database_checksums(copy)
    finally:
        copy.cleanup()
    assert changed["postgres"]["public.items"] != source["postgres"]["public.items"]
    assert changed["postgres"]["public.items"].startswith("500:")
    assert {k: v for k, v in changed.items() if k != "postgres"} == {"shop": source["shop"]}
    assert database_checksums(pg) == source


# -- environment ---------------------------------------------------------------------------------


def test_environment_is_scrubbed() -> None:
    leaked = [k for k in os.environ if k.startswith(("DRKIT_", "AWS_", "VAULT_", "BAO_", "PG"))]
    assert leaked == []


# -- S3 ------------------------------------------------------------------------------------------


def test_s3_put_get_and_outage_on_the_same_port(s3: S3Server) -> None:
    client = s3.client()
    client.create_bucket(Bucket="rig")
    client.put_object(Bucket="rig", Key="a/b.bin", Body=b"payload")
    assert client.get_object(Bucket="rig", Key="a/b.bin")["Body"].read() == b"payload"
    endpoint = s3.endpoint_url

    s3.stop()  # outage: refused, but the data is kept
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s3.port), timeout=2)
    with pytest.raises(Exception, match=r"(?i)connect"):
        client.get_object(Bucket="rig", Key="a/b.bin")
    s3.start()
    assert s3.endpoint_url == endpoint
    assert client.get_object(Bucket="rig", Key="a/b.bin")["Body"].read() == b"payload"

    s3.stop(wipe=True)  # a real process restart: same endpoint, empty server
    s3.start()
    assert s3.endpoint_url == endpoint
    assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == []


def test_s3_env_serves_a_subprocess(s3: S3Server, workdir: Path) -> None:
    s3.client().create_bucket(Bucket="env-check")
    code = (
        "import boto3; c = boto3.client('s3', config=__import__('botocore').config.Config("
        "s3={'addressing_style': 'path'})); print([b['Name'] for b in c.list_buckets()['Buckets']])"
    )
    env = {**os.environ, **s3.env()}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=workdir,
    ).stdout
    assert "env-check" in out


# -- Vault ---------------------------------------------------------------------------------------


def test_vault_health_and_transit(vault: VaultServer) -> None:
    health = vault.health()
    assert health["initialized"] is True and health["sealed"] is False
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    vault.enable_transit(mount)
    vault.enable_transit(mount)  # idempotent
    vault.api("POST", f"{mount}/keys/drkit", {"type": "aes256-gcm96"})
    datakey = vault.api("POST", f"{mount}/datakey/plaintext/drkit", {"bits": 256})["data"]
    assert datakey["ciphertext"].startswith("vault:v1:")
    unwrapped = vault.api("POST", f"{mount}/decrypt/drkit", {"ciphertext": datakey["ciphertext"]})
    assert unwrapped["data"]["plaintext"] == datakey["plaintext"]
    assert set(vault.env()) == {"VAULT_ADDR", "VAULT_TOKEN"}


def test_vault_outage_seal_and_wipe(vault: VaultServer) -> None:
    if not isinstance(vault, OpenBaoServer):
        pytest.skip("outage/seal semantics checked on the local provider")
    mount = f"transit-{uuid.uuid4().hex[:8]}"
    vault.enable_transit(mount)
    vault.api("POST", f"{mount}/keys/k")

    vault.stop()
    with pytest.raises(urllib.error.URLError):
        vault.api("GET", "sys/mounts")
    vault.start()
    assert f"{mount}/" in vault.api("GET", "sys/mounts")["data"]  # state survived the outage

    vault.seal()
    assert vault.health()["sealed"] is True
    with pytest.raises(urllib.error.HTTPError) as err:
        vault.api("POST", f"{mount}/datakey/plaintext/k")
    assert err.value.code == 503
    vault.unseal()
    assert vault.health()["sealed"] is False

    vault.stop(wipe=True)  # "Vault lost": same address and token, nothing in it
    vault.start()
    assert f"{mount}/" not in vault.api("GET", "sys/mounts")["data"]


# -- Docker provider -----------------------------------------------------------------------------


def test_compose_file_declares_the_docker_provider() -> None:
    yaml = pytest.importorskip("yaml")
    compose = Path(__file__).resolve().parent.parent / "docker-compose.test.yml"
    services = yaml.safe_load(compose.read_text())["services"]
    assert {"postgres15", "postgres18", "minio", "openbao"} <= set(services)
    for service in services.values():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:${TESTRIG_"), mapping  # loopback, run-time port


def test_pg_containers_answer(pg_container: Callable[[int], str]) -> None:
    psycopg = pytest.importorskip("psycopg")
    for version in (15, 18):
        with psycopg.connect(pg_container(version)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        assert row is not None and str(row[0]).startswith(str(version))
