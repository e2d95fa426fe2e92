"""End to end: full backup of a running cluster, restore, start, compare every table row by row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rig.drkit import Drkit, check_indexes, start_restored
from rig.postgres import PgCluster, database_checksums

SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric, note text);
INSERT INTO accounts
  SELECT g, 'owner ' || g, (g * 7919) % 100000 / 100.0, repeat(md5(g::text), g % 5)
  FROM generate_series(1, 120000) g;
CREATE INDEX accounts_owner ON accounts (owner);
CREATE TABLE documents (id serial PRIMARY KEY, body text);
INSERT INTO documents (body)                      -- TOASTed, hardly compressible values
  SELECT string_agg(md5(g::text || '-' || i::text), '') FROM generate_series(1, 40) g,
         generate_series(1, 300) i GROUP BY i;
CREATE TABLE small (k int, v jsonb);
INSERT INTO small VALUES (1, '{"a": 1}'), (2, '{"b": [1, 2]}');
CREATE UNLOGGED TABLE scratch (x int);
INSERT INTO scratch SELECT generate_series(1, 1000);
CREATE MATERIALIZED VIEW owners_per_bucket AS
  SELECT balance::int % 10 AS bucket, count(*) FROM accounts GROUP BY 1;
CREATE SEQUENCE counter START 41;
SELECT nextval('counter');
SELECT lo_from_bytea(424242, convert_to(repeat('large object ', 50000), 'UTF8'));
"""
LARGE_OBJECT = "SELECT md5(lo_get(424242))"


def populate(cluster: PgCluster, tablespace: Path | None = None) -> None:
    cluster.psql(SCHEMA)
    cluster.psql("CREATE DATABASE shop")
    cluster.psql(
        "CREATE TABLE orders AS SELECT g AS id, now() - g * interval '1 minute' AS at"
        " FROM generate_series(1, 20000) g",
        dbname="shop",
    )
    if tablespace is not None:
        cluster.psql(f"CREATE TABLESPACE fast LOCATION '{tablespace}'")
        cluster.psql(
            "CREATE TABLE hot TABLESPACE fast AS SELECT g, md5(g::text) FROM"
            " generate_series(1, 30000) g"
        )


def backup_label_of(result_stdout: str) -> str:
    return result_stdout.split()[1]


def test_full_backup_restores_identical_data(pg: PgCluster, workdir: Path) -> None:
    populate(pg, pg.make_tablespace_dir("fast"))
    # Small bundles and a low large-file threshold: many objects, several workers, bundles and
    # single-file objects both exercised on a small database.
    dk = Drkit(pg, workdir, backup={"bundle_limit": 64 * 1024, "bundle_size": 1024 * 1024})
    dk.ok("init")
    backup = dk.ok("backup", "--type", "full", "--json")
    label = json.loads(backup.stdout)["label"]
    source = database_checksums(pg)
    sequence = pg.psql("SELECT last_value FROM counter")
    large_object = pg.psql(LARGE_OBJECT)

    # The source moves on after the backup; the restore must show the backup's state.
    pg.psql("UPDATE accounts SET balance = 0 WHERE id < 500; DROP TABLE small")

    info = dk.info()
    assert [b["label"] for b in info["backups"]] == [label]
    assert info["backups"][0]["stored"] < info["backups"][0]["size"]
    # The same listing from the drkit command itself, through a pipe (block-buffered): the
    # command ends with os._exit, so what it wrote must have been flushed first
    drkit = Path(sys.executable).parent / "drkit"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    piped = subprocess.run([str(drkit), "info", "--json", "--config", str(dk.config)],
                           capture_output=True, text=True, timeout=120, env=buffered)  # fmt: skip
    assert [b["label"] for b in json.loads(piped.stdout)["backups"]] == [label]

    target = workdir / "restored"
    ts_target = workdir / "fast-restored"
    result = dk.ok("restore", "--pgdata", str(target), "--tablespace-map", f"fast={ts_target}")
    assert "pg_ctl" in result.stdout and str(target) in result.stdout
    assert oct(target.stat().st_mode & 0o777) == "0o700"
    assert (target / "backup_label").is_file()

    restored = start_restored(target, pg.version, workdir)
    assert database_checksums(restored) == source
    # its start synced the data directory with one syncfs, not an fsync of every file
    assert restored.psql("SHOW recovery_init_sync_method") == "syncfs"
    assert restored.psql("SELECT last_value FROM counter") == sequence
    assert restored.psql(LARGE_OBJECT) == large_object
    # Unlogged tables come back empty (PostgreSQL resets them from their init fork).
    assert restored.psql("SELECT count(*) FROM scratch") == "0"
    location = restored.psql(
        "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'fast'"
    )
    assert Path(location) == ts_target
    assert restored.psql("SELECT count(*) FROM hot") == "30000"


def test_backup_during_writes_is_consistent(pg: PgCluster, workdir: Path) -> None:
    """pgbench keeps writing while the backup runs; the restored copy is one consistent instant
    (pgbench's balances agree across all four tables) and passes amcheck."""
    pg.run_bin("pgbench", "-i", "-s", "4", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    bench = subprocess.Popen(
        [str(pg.bindir / "pgbench"), "-c", "2", "-T", "20", "-n"],
        env={**os.environ, **pg.client_env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user="postgres",
    )
    try:
        time.sleep(2)
        dk.ok("backup")
    finally:
        bench.terminate()
        bench.wait()
    target = workdir / "restored"
    dk.ok("restore", "--pgdata", str(target))
    restored = start_restored(target, pg.version, workdir)
    sums = restored.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts),"
        " (SELECT sum(tbalance) FROM pgbench_tellers),"
        " (SELECT sum(bbalance) FROM pgbench_branches),"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
    ).split("|")
    assert len(set(sums)) == 1, sums
    assert int(restored.psql("SELECT count(*) FROM pgbench_history")) > 0
    check_indexes(restored)


def test_restore_refuses_non_empty_directory(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    target = workdir / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    result = dk.run("restore", "--pgdata", str(target))
    assert result.exit_code == 14
    assert f"unable to restore to path '{target}' because it contains files" in result.stderr
    assert "HINT:" in result.stderr
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me"


def test_wrong_key_is_refused_and_writes_nothing(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    other = workdir / "other"
    other.mkdir()
    wrong = Drkit(pg, other)  # same cluster and repository, a different key file
    wrong.repo_path = dk.repo_path
    wrong.write_config()
    wrong.config.write_text(
        wrong.config.read_text().replace(str(other / "repo"), str(dk.repo_path))
    )
    target = workdir / "restored"
    result = wrong.run("restore", "--pgdata", str(target))
    assert result.exit_code == 12, result.output
    assert "wrapped by keyfile key" in result.stderr
    assert not target.exists()
    before = dk.repo_listing()
    assert wrong.run("verify").exit_code == 12  # the key is wrong, the backup is fine
    assert dk.repo_listing() == before


def test_damaged_object_is_reported_and_never_restored(pg: PgCluster, workdir: Path) -> None:
    pg.psql(SCHEMA)
    dk = Drkit(pg, workdir, backup={"bundle_limit": 64 * 1024})
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    data = sorted(
        (dk.repo_path / "backup" / label / "data").iterdir(), key=lambda p: p.stat().st_size
    )
    victim = data[-1]  # the largest object: a single big relation file
    victim.chmod(0o600)
    with victim.open("r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))

    verify = dk.run("verify", "--json")
    assert verify.exit_code == 15
    report = json.loads(verify.stdout)
    damaged = report["backups"][0]["damaged"]
    assert len(damaged) == 1 and damaged[0]["path"].startswith("base/")
    assert "authentication" in damaged[0]["reason"] or "checksum" in damaged[0]["reason"]
    text = dk.run("verify")
    assert f"damaged '{damaged[0]['path']}'" in text.stderr

    target = workdir / "restored"
    result = dk.run("restore", "--pgdata", str(target))
    assert result.exit_code == 13
    assert damaged[0]["path"] in result.stderr
    assert not target.exists() or not any(target.iterdir())


def test_missing_object_is_reported_by_verify(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    bundle = sorted((dk.repo_path / "backup" / label / "data").iterdir())[0]
    bundle.unlink()
    report = json.loads(dk.run("verify", "--json").stdout)
    assert not report["ok"]
    assert len(report["backups"][0]["damaged"]) >= 1
    assert all(
        "not" in d["reason"] or "missing" in d["reason"] for d in report["backups"][0]["damaged"]
    )


def test_second_backup_while_one_runs_is_refused(pg: PgCluster, workdir: Path) -> None:
    """A lock holder in another process (as a running backup is) blocks a second backup; killing
    it with -9 releases the lock, so the next backup runs."""
    dk = Drkit(pg, workdir)
    dk.ok("init")
    lock_dir, scope = str(workdir / "locks"), f"posix:{dk.repo_path}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from pathlib import Path\n"
            "from drkit.repo.lock import operation_lock\n"
            f"with operation_lock(Path({lock_dir!r}), {scope!r}, 'backup'):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = dk.repo_listing()
        result = dk.run("backup")
        assert result.exit_code == 5, result.output
        assert f"pid {holder.pid}" in result.stderr
        assert dk.repo_listing() == before
    finally:
        holder.kill()
        holder.wait()
    dk.ok("backup")
    assert len(dk.info()["backups"]) == 1


def test_killed_backup_is_never_listed_and_next_backup_succeeds(
    pg: PgCluster, workdir: Path
) -> None:
    pg.run_bin("pgbench", "-i", "-s", "8", "-q")
    dk = Drkit(pg, workdir, backup={"process_max": 1, "bundle_limit": 1024 * 1024})
    dk.ok("init")
    proc = dk.spawn("backup")
    data_dir = dk.repo_path / "backup"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(data_dir.glob("*/data/*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the backup ended before it was killed: {proc.communicate()}"
    proc.kill()
    proc.wait()
    assert any(data_dir.glob("*/data/*")), "the backup was killed before it wrote anything"
    assert not any(data_dir.glob("*/manifest"))
    info = dk.info()
    assert info["backups"] == [] and len(info["incomplete"]) == 1

    source = database_checksums(pg)
    result = dk.run("backup")
    assert result.exit_code == 0, result.output
    assert "removed the objects of incomplete backup" in result.stderr
    info = dk.info()
    assert len(info["backups"]) == 1 and info["incomplete"] == []
    target = workdir / "restored"
    dk.ok("restore", "--pgdata", str(target))
    assert database_checksums(start_restored(target, pg.version, workdir)) == source


def test_page_checksum_failure_is_reported(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE victim AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    pg.psql("CHECKPOINT")
    relpath = pg.psql("SELECT pg_relation_filepath('victim')")
    pg.stop()
    with (pg.pgdata / relpath).open("r+b") as f:
        f.seek(8192 * 3 + 4000)  # inside page 3's tuples, leaving the header intact
        f.write(b"\xde\xad\xbe\xef")
    pg.start()
    dk = Drkit(pg, workdir)
    dk.ok("init")
    result = dk.run("backup")
    assert result.exit_code == 101, result.output  # PageChecksumFailure
    assert f"page checksum failure in '{relpath}' block 3" in result.stderr
    info = dk.info()
    assert info["backups"][0]["bad_pages"] == 1


def test_postgres_down_gives_clear_error(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    pg.stop()
    result = dk.run("backup")
    assert result.exit_code == 4
    assert "unable to connect to PostgreSQL" in result.stderr
    assert "HINT:" in result.stderr
    assert dk.info()["backups"] == []


def test_repository_of_another_cluster_is_refused(
    pg: PgCluster,
    pg_factory,
    workdir: Path,  # type: ignore[no-untyped-def]
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    other_cluster = pg_factory(pg.version)
    other = Drkit(
        other_cluster,
        workdir / "x" if (workdir / "x").mkdir() is None else workdir,
        keyfile=dk.keyfile,
    )
    other.repo_path = dk.repo_path
    other.config.write_text(
        other.config.read_text().replace(str(workdir / "x" / "repo"), str(dk.repo_path))
    )
    result = other.run("backup")
    assert result.exit_code == 6
    assert "belongs to database system" in result.stderr


def test_two_restores_at_once(pg: PgCluster, workdir: Path) -> None:
    """Two restores of one backup at once (a drill and an operator) both produce the data."""
    populate(pg)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    source = database_checksums(pg)
    procs = [dk.spawn("restore", "--pgdata", str(workdir / name)) for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    for name in ("a", "b"):
        restored = start_restored(workdir / name, pg.version, workdir)
        assert database_checksums(restored) == source
        restored.stop()


def test_init_checks_the_cluster_and_is_idempotent(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    first = dk.ok("init")
    assert "ok: data checksums are on" in first.stdout
    assert "notice: WAL archiving is off" in first.stdout
    assert f"drkit wal-push --config {dk.config} %p" in first.stdout  # absolute, pasteable
    assert "key provider 'keyfile' works" in first.stdout
    assert "repository 'local': created" in first.stdout
    assert "repository 'local': exists" in dk.ok("init").stdout

    minimal = {"wal_level": "minimal", "max_wal_senders": 0, "archive_mode": "off"}
    if pg.version >= 17:
        minimal["summarize_wal"] = "off"  # the server refuses to summarize minimal WAL
    pg.set_conf(minimal)
    pg.restart()
    result = dk.run("init")
    assert result.exit_code == 4
    assert "wal_level is 'minimal'" in result.stderr and "HINT:" in result.stderr
    assert dk.run("backup").exit_code == 4


def test_truncated_object_is_reported_and_never_restored(pg: PgCluster, workdir: Path) -> None:
    pg.psql(SCHEMA)
    dk = Drkit(pg, workdir, backup={"bundle_limit": 64 * 1024})
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    data = dk.repo_path / "backup" / label / "data"
    victim = max(data.iterdir(), key=lambda p: p.stat().st_size)
    victim.chmod(0o600)
    os.truncate(victim, victim.stat().st_size // 2)

    report = json.loads(dk.run("verify", "--json").stdout)
    assert not report["ok"]
    [damaged] = report["backups"][0]["damaged"]
    assert damaged["path"].startswith("base/")
    target = workdir / "restored"
    result = dk.run("restore", "--pgdata", str(target))
    assert result.exit_code == 13 and damaged["path"] in result.stderr
    assert not target.exists() or not any(target.iterdir())


def test_missing_repository_gives_clear_errors(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)  # never initialized
    where = f"repository 'local' is not initialized: no format object in directory '{dk.repo_path}'"
    for args in (["backup"], ["info"], ["verify"], ["restore", "--pgdata", str(workdir / "r")]):
        result = dk.run(*args)
        assert result.exit_code == 22, (args, result.output)
        assert where in result.stderr
        if args[0] in ("backup", "info"):
            assert "HINT: run 'drkit init' first" in result.stderr
        else:  # reading commands: a repository that is not there is never created to read it
            assert "drkit init" not in result.stderr and "mounted" in result.stderr
        assert "Traceback" not in result.output
    assert not (workdir / "r").exists()
