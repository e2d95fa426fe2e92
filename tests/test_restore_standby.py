"""drkit restore --type standby: the restored cluster stays in recovery and follows its primary,
by streaming (primary_conninfo) and from the archive (drkit wal-fetch). Real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

from rig.archive import enable_archiving
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster


def test_a_standby_restore_streams_and_replays_from_its_primary(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger (id int)")
    pg.psql("INSERT INTO ledger VALUES (1)")
    dk.ok("backup")
    pg.psql("INSERT INTO ledger VALUES (2)")  # after the backup: WAL the standby must get

    conninfo = f"host={pg.socket_dir} port={pg.port} user=postgres application_name=restored"
    target = workdir / "standby"
    result = dk.ok(
        "restore", "--pgdata", str(target), "--type", "standby", "--primary-conninfo", conninfo
    )
    assert "a standby: it replays the backup's WAL, then follows the primary" in result.stdout
    assert (target / "standby.signal").is_file() and not (target / "recovery.signal").exists()
    settings = (target / "postgresql.auto.conf").read_text()
    assert f"primary_conninfo = '{conninfo}'" in settings
    assert "archive_mode = 'off'" in settings and "wal-fetch" in settings

    standby = attach_cluster(target, pg.version, workdir)
    standby.start(timeout=120)
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    pg.psql("INSERT INTO ledger VALUES (3)")  # written after the standby started
    deadline = time.monotonic() + 60
    while standby.psql("SELECT count(*) FROM ledger") != "3":
        assert time.monotonic() < deadline, "the standby never replayed the primary's new rows"
        time.sleep(0.1)
    assert pg.psql("SELECT state FROM pg_stat_replication WHERE application_name = 'restored'") == (
        "streaming"
    )
    assert standby.psql("SELECT status FROM pg_stat_wal_receiver") == "streaming"


def test_standby_settings_that_cannot_work_are_refused_before_writing(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    target = workdir / "standby"

    password = dk.run(
        "restore", "--pgdata", str(target), "--type", "standby",
        "--primary-conninfo", "host=db1 user=replicator password=secret",
    )  # fmt: skip
    assert password.exit_code == 3, password.output
    assert "--primary-conninfo holds a password" in password.stderr
    assert "HINT: give the replication user's password in" in password.stderr
    assert "secret" not in password.output

    with_target = dk.run("restore", "--pgdata", str(target), "--type", "standby", "--target-latest")
    assert with_target.exit_code == 3 and "a standby has no recovery target" in with_target.stderr

    alone = dk.run("restore", "--pgdata", str(target), "--primary-conninfo", "host=db1")
    assert alone.exit_code == 2 and "--primary-conninfo goes with --type standby" in alone.stderr
    assert not target.exists()
