"""WAL archiving with real PostgreSQL: archive_command and restore_command run drkit as the server
user. Synchronous and asynchronous pushing, gaps in info/verify, a repository that refuses writes
for a while, and recovery that fetches WAL — and aborts, instead of ending early, at a damaged
archived segment."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import pytest
from rig.archive import (
    archiver_status,
    drkit_command,
    enable_archiving,
    switch_wal,
    wait_archived,
)
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, chown_to_server_user

from drkit.config.settings import load_settings
from drkit.errors import ServerControlError
from drkit.repo.wal_archive import WalArchive
from drkit.verify.operation import VerifyOperation
from drkit.wal.config import load_wal_config


def archive_of(dk: Drkit) -> WalArchive:
    return WalArchive(load_wal_config(dk.config).open_repository())


def _locked(path: Path) -> bool:
    """Whether a process holds the flock on ``path`` (drkit's own probe refuses, as root, a
    spool the postgres user owns)."""
    with path.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_archive_command_archives_every_segment(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    pg.run_bin("pgbench", "-c", "2", "-T", "3", "-n")
    switched = [switch_wal(pg) for _ in range(3)]
    wait_archived(pg, switched[-1])
    assert archiver_status(pg)[2] == 0  # no failed attempt

    archive = archive_of(dk)
    segments = archive.segments(1)
    assert set(switched) <= set(segments)
    assert len(segments) > len(switched)  # pgbench filled some on its own
    assert archive.find_gaps(1, segments[0], segments[-1]) == []
    assert archive.segment_size == 16 * 1024 * 1024
    assert archive.timelines() == [1]

    [timeline] = dk.info()["wal"]
    assert (timeline["first"], timeline["last"]) == (segments[0], segments[-1])
    assert timeline["segments"] == len(segments) and timeline["missing"] == []

    victim = segments[len(segments) // 2]
    (dk.repo_path / "wal" / "00000001" / victim).unlink()
    [timeline] = dk.info()["wal"]
    assert timeline["missing"] == [[victim, victim]] and timeline["missing_count"] == 1
    text = dk.run("info")
    assert f"WAL archive gap on timeline 1: {victim} missing" in " ".join(text.output.split())

    report = VerifyOperation(load_settings(dk.config), wal=True).run()
    assert report.wal is not None and not report.ok
    assert report.wal.gaps == [(1, victim, victim)]
    assert report.wal.damaged == [] and report.wal.files == len(segments) - 1


def test_async_archiving_pushes_a_burst_and_survives_a_refusing_repository(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, async_=True, process_max=2)
    spool = workdir / "spool"
    switched = [switch_wal(pg) for _ in range(8)]
    wait_archived(pg, switched[-1])
    archive = archive_of(dk)
    assert set(switched) <= set(archive.segments(1))
    assert list(spool.glob("*.ok")) == list(spool.glob("*.error")) == []
    wait_for(lambda: not _locked(spool / "pusher.lock"), 30, "the idle pusher to exit")

    # The repository refuses writes for a while: PostgreSQL keeps the segment and retries.
    timeline_dir = dk.repo_path / "wal" / "00000001"
    timeline_dir.chmod(0o555)
    try:
        failures = archiver_status(pg)[2]
        refused = switch_wal(pg)
        wait_for(lambda: archiver_status(pg)[2] > failures, 60, "a failed archive attempt")
        archive.refresh()
        assert refused not in archive.segments(1)
        assert (pg.pgdata / "pg_wal" / "archive_status" / f"{refused}.ready").exists()
        log = pg.log_tail(300)
        assert "drkit wal-push: error: permission denied" in log, log
    finally:
        timeline_dir.chmod(0o750)
    later = switch_wal(pg)  # a new segment wakes the archiver, which retries the oldest first
    wait_archived(pg, later, timeout=120)
    archive.refresh()
    assert {refused, later} <= set(archive.segments(1))
    segments = archive.segments(1)
    assert archive.find_gaps(1, segments[0], segments[-1]) == []
    for name in (refused, later):
        archive.check(name)


def test_recovery_fetches_wal_and_aborts_at_a_damaged_segment(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
    copy = workdir / "copy"
    # A base backup without WAL: recovery must fetch all of it from the repository.
    pg.run_bin("pg_basebackup", "-D", str(copy), "-X", "none", "-c", "fast")
    pg.psql("INSERT INTO t SELECT generate_series(1001, 2000)")
    after = switch_wal(pg)  # holds the rows inserted after the base backup
    wait_archived(pg, after)
    expected = pg.psql("SELECT count(*), sum(i) FROM t")

    damaged = dk.repo_path / "wal" / "00000001" / after
    original = damaged.read_bytes()
    damaged.chmod(0o640)
    damaged.write_bytes(original[:-100] + bytes(b ^ 0xFF for b in original[-100:]))
    restored = attach_cluster(
        copy,
        pg.version,
        workdir,
        {"restore_command": drkit_command(dk, "wal-fetch", "%f", "%p")},
    )
    (copy / "recovery.signal").touch()
    chown_to_server_user(copy / "recovery.signal")
    # Recovery aborts: it does not take the damage for the end.
    with pytest.raises(ServerControlError):
        restored.start(timeout=60)
    log = restored.log_tail(200)
    assert f"drkit wal-fetch: error: archived WAL file '{after}'" in log, log
    assert "exit code 213" in log, log
    assert not (copy / "pg_wal" / "RECOVERYXLOG").exists()

    damaged.write_bytes(original)
    damaged.chmod(0o440)
    restored.start(timeout=120)
    wait_for(lambda: restored.psql("SELECT pg_is_in_recovery()") == "f", 60, "promotion")
    assert restored.psql("SELECT count(*), sum(i) FROM t") == expected

    # The promoted copy archives its new timeline, history file first, into the same repository.
    history = restored.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")[:8] + ".history"
    new_segment = switch_wal(restored)
    wait_archived(restored, new_segment)
    archive = archive_of(dk)
    assert archive.timelines() == [1, 2] and history == "00000002.history"
    [(parent, switch_lsn)] = archive.history(2)
    assert parent == 1 and switch_lsn > 0
    assert archive.read(history) == (copy / "pg_wal" / history).read_bytes()
    assert new_segment in archive.segments(2)
    [_, timeline2] = dk.info()["wal"]
    assert timeline2["timeline"] == 2 and timeline2["history"] is True
