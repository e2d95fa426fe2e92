"""A backup interrupted by Ctrl-C or by PostgreSQL stopping: it says so at once, ends cleanly
(backup mode ended on the server, nothing partial listed) and the next backup succeeds."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.errors import PostgresError


def _wait_for_copying(dk: Drkit, proc) -> None:  # type: ignore[no-untyped-def]
    """Until the backup is copying: its WAL slot taken and a data object being written (at zstd
    level 19 each takes seconds, so more are in flight when the test strikes)."""
    deadline = time.monotonic() + 60
    slot = "SELECT count(*) FROM pg_replication_slots WHERE temporary"
    while time.monotonic() < deadline and proc.poll() is None:
        if dk.cluster.psql(slot) == "1" and any((dk.repo_path / ".tmp").glob("write-*")):
            return
        time.sleep(0.05)
    raise AssertionError(f"the backup ended or never started copying: {proc.poll()}")


def test_ctrl_c_stops_a_backup_within_seconds_and_cleanly(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "4", "-q")
    # the slowest setting there is: a chunk in flight takes seconds to compress
    dk = Drkit(pg, workdir, backup={"process_max": 2, "compress_level": 19})
    dk.ok("init")
    proc = dk.spawn("backup")
    _wait_for_copying(dk, proc)

    proc.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - interrupted
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert seconds < 3, f"took {seconds:.1f}s to stop"
    assert "error: backup interrupted by SIGINT" in stderr and "Traceback" not in stderr
    # the server left backup mode with the session: its temporary slot is gone too (a backend
    # ends a moment after its client: the server sees the closed connection on its next read)
    left = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'drkit'"
    deadline = time.monotonic() + 10
    while pg.psql(left) != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pg.psql(left) == "0"
    assert pg.psql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert dk.info()["backups"] == []
    dk.ok("backup", "--compress-level", "1")
    assert len(dk.info()["backups"]) == 1


def test_a_spread_checkpoint_is_announced_with_its_bound(pg: PgCluster, workdir: Path) -> None:
    pg.set_conf({"checkpoint_timeout": "30s", "checkpoint_completion_target": 0.9})
    pg.reload()
    dk = Drkit(pg, workdir)
    dk.ok("init")
    result = dk.ok("backup", "--no-start-fast")
    assert "waiting for a spread checkpoint (up to 27 s; --start-fast to skip)" in result.stderr
    assert "spread checkpoint" not in dk.ok("backup", "--start-fast").stderr


def test_postgresql_stopping_mid_backup_stops_it_at_once(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "8", "-q")
    # zstd level 12, one worker: copying the rest would take far longer than the test waits
    dk = Drkit(pg, workdir, backup={"process_max": 1, "compress_level": 12})
    dk.ok("init")
    proc = dk.spawn("backup")
    _wait_for_copying(dk, proc)

    pg.stop("fast")  # terminates drkit's session, and with it the backup on the server's side
    stopped = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - stopped
    assert seconds < 10, f"the backup went on for {seconds:.1f}s: {stderr}"
    assert proc.returncode == PostgresError.exit_code, stderr
    assert "error: the connection to PostgreSQL was lost" in stderr
    assert "HINT: PostgreSQL stopped or ended drkit's session" in stderr
    assert "Traceback" not in stderr
    assert dk.info()["backups"] == []
    pg.start()
    dk.ok("backup", "--compress-level", "1")
    assert len(dk.info()["backups"]) == 1
