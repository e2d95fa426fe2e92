"""Recovery never opens a copy at another point than the one asked for, silently: a repository
that vanished during a PITR aborts recovery (no early promotion), and a target before the end
of the chosen backup is refused before anything is written. Real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, chown_to_server_user

from drkit.errors import RepositoryMissing, ServerControlError


def write_batch(cluster: PgCluster, batch: int) -> None:
    cluster.psql(f"INSERT INTO ledger SELECT g, {batch} FROM generate_series(1, 1000) g")


def test_recovery_aborts_when_the_repository_is_gone(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger (id int, batch int)")
    write_batch(pg, 1)
    dk.ok("backup")
    for batch in (2, 3, 4):
        write_batch(pg, batch)
        switch_wal(pg)
    wait_archived(pg, switch_wal(pg))

    # Recovery to the end of the archive: "not archived" would end it at once, and the copy
    # would open with batch 1 only (the WAL the backup carries), saying nothing.
    copy = workdir / "copy"
    dk.ok("restore", "--pgdata", str(copy), "--target-latest")
    # The repository's file system is unmounted: an empty mount point remains.
    unmounted = workdir / "repo-unmounted"
    dk.repo_path.rename(unmounted)
    dk.repo_path.mkdir()
    chown_to_server_user(dk.repo_path)

    restored = attach_cluster(copy, pg.version, workdir, {"archive_mode": "off"})
    with pytest.raises(ServerControlError) as failed:
        restored.start(timeout=120)
        restored.wait_promoted(timeout=60)
    log = failed.value.log_tail or restored.log_tail(200)
    code = 200 + RepositoryMissing.exit_code
    assert "FATAL" in log and f"exit code {code}" in log, log
    assert "is not initialized: no format object in directory" in log, log
    assert not restored.is_running()
    assert (copy / "recovery.signal").exists()  # never promoted: nothing was opened early

    # Mounted again, the same copy recovers every archived change.
    dk.repo_path.rmdir()
    unmounted.rename(dk.repo_path)
    restored.start(timeout=120)
    restored.wait_promoted(timeout=60)
    assert restored.psql("SELECT max(batch) FROM ledger") == "4"
    restored.stop()


def test_a_standby_stops_when_the_repository_vanishes_under_it(
    pg: PgCluster, workdir: Path
) -> None:
    """Recovery in progress (a standby replaying the archive, asking for the next segment
    every 100 ms): the repository goes away, and recovery stops at the next request instead
    of taking "not archived" for "nothing new yet" forever, or for the end of the archive."""
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger (id int, batch int)")
    dk.ok("backup")
    write_batch(pg, 1)
    wait_archived(pg, switch_wal(pg))
    archived_lsn = pg.psql("SELECT pg_current_wal_lsn()")

    copy = workdir / "standby"
    dk.ok("restore", "--pgdata", str(copy), "--target-latest")
    (copy / "standby.signal").touch()
    standby = attach_cluster(
        copy, pg.version, workdir, {"archive_mode": "off", "wal_retrieve_retry_interval": "100ms"}
    )
    standby.start(timeout=120)
    deadline = time.monotonic() + 60
    while standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{archived_lsn}'") != "t":
        assert time.monotonic() < deadline, standby.log_tail()
        time.sleep(0.1)
    assert standby.psql("SELECT count(*) FROM ledger") == "1000"

    dk.repo_path.rename(workdir / "repo-unmounted")
    dk.repo_path.mkdir()
    deadline = time.monotonic() + 30
    while standby.is_running():
        assert time.monotonic() < deadline, "the standby kept waiting: " + standby.log_tail()
        time.sleep(0.1)
    log = standby.log_tail(200)
    assert "FATAL" in log and f"exit code {200 + RepositoryMissing.exit_code}" in log, log
    assert (copy / "standby.signal").exists()  # stopped in recovery, never promoted


def test_a_target_before_the_chosen_backup_is_refused(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger (id int, batch int)")
    write_batch(pg, 1)
    dk.ok("backup")
    write_batch(pg, 2)
    wait_archived(pg, switch_wal(pg))
    between_time = pg.psql("SELECT to_char(clock_timestamp(), 'YYYY-MM-DD HH24:MI:SS.US+00')")
    between_lsn = pg.psql("SELECT pg_current_wal_lsn()")
    write_batch(pg, 3)
    dk.ok("backup", "--type", "full")
    second = dk.info()["backups"][-1]["label"]
    wait_archived(pg, switch_wal(pg))

    target = workdir / "never"
    for flag, value in (("--target-time", between_time), ("--target-lsn", between_lsn)):
        result = dk.run("restore", "--pgdata", str(target), "--backup", second, flag, value)
        assert result.exit_code == 16, result.output
        assert f"is before the end of backup '{second}'" in result.stderr, result.stderr
        assert "choose an older backup" in result.stderr
        assert not target.exists()

    # Without --backup, drkit picks the older backup, which reaches the target.
    dk.ok("restore", "--pgdata", str(target), "--target-lsn", between_lsn)
    assert (target / "recovery.signal").exists()
