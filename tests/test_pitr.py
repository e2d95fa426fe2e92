"""Point-in-time recovery with real archive_command and restore_command running drkit."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, chown_to_server_user, database_checksums

NO_ARCHIVING = {"archive_mode": "off"}


def write_batch(cluster: PgCluster, batch: int) -> None:
    cluster.psql(
        f"INSERT INTO ledger SELECT g, {batch}, md5(g::text || '{batch}')"
        f" FROM generate_series({batch * 1000}, {batch * 1000 + 999}) g"
    )


def now(cluster: PgCluster) -> str:
    """The server's clock, between two commits (1 s away from each)."""
    time.sleep(1.1)
    stamp = cluster.psql("SELECT to_char(clock_timestamp(), 'YYYY-MM-DD HH24:MI:SS.US+00')")
    time.sleep(1.1)
    return stamp


def archive_everything(cluster: PgCluster) -> None:
    wait_archived(cluster, switch_wal(cluster))


def archiving_ledger(pg: PgCluster, workdir: Path, **drkit: Any) -> Drkit:
    """drkit set up for ``pg`` (``drkit``: more Drkit arguments), archiving, an empty ledger."""
    dk = Drkit(pg, workdir, **drkit)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE ledger (id int, batch int, v text)")
    return dk


def backup_between_batches(dk: Drkit) -> tuple[dict[str, dict[str, str]], str]:
    """Batch 1, the backup, batch 2, a moment, batch 3 (not archived yet): the database at that
    moment (its checksums) and the moment."""
    pg = dk.cluster
    write_batch(pg, 1)
    dk.ok("backup")
    write_batch(pg, 2)
    after_batch_2 = database_checksums(pg)
    between = now(pg)
    write_batch(pg, 3)
    return after_batch_2, between


def restore_to(dk: Drkit, workdir: Path, name: str, *target: str, conf=NO_ARCHIVING) -> PgCluster:  # type: ignore[no-untyped-def]
    target_dir = workdir / name
    dk.ok("restore", "--pgdata", str(target_dir), *target)
    assert (target_dir / "recovery.signal").exists()
    restored = attach_cluster(target_dir, dk.cluster.version, workdir, conf)
    restored.start(timeout=120)
    restored.wait_promoted(timeout=60)
    return restored


def test_pitr_to_time_and_restore_point(pg: PgCluster, workdir: Path) -> None:
    dk = archiving_ledger(pg, workdir)
    after_batch_2, between = backup_between_batches(dk)
    pg.psql("SELECT pg_create_restore_point('before_batch_4')")
    after_batch_3 = database_checksums(pg)
    write_batch(pg, 4)
    archive_everything(pg)

    restored = restore_to(dk, workdir, "at-time", "--target-time", between)
    assert database_checksums(restored) == after_batch_2
    restored.stop()

    restored = restore_to(dk, workdir, "at-name", "--target-name", "before_batch_4")
    assert database_checksums(restored) == after_batch_3


def test_unreachable_targets_are_refused_before_writing(pg: PgCluster, workdir: Path) -> None:
    dk = archiving_ledger(pg, workdir)
    before_backup = now(pg)
    dk.ok("backup")
    write_batch(pg, 1)
    archive_everything(pg)
    write_batch(pg, 2)  # committed, never archived: past the end of the archive
    past_archive = now(pg)

    target = workdir / "never"
    cases = {
        "2999-01-01 00:00:00+00": "is in the future",
        past_archive: "is past the end of the archived WAL",
        before_backup: "is before the end of the oldest backup",
    }
    for when, message in cases.items():
        result = dk.run("restore", "--pgdata", str(target), "--target-time", when)
        assert result.exit_code == 16, result.output
        assert message in result.stderr, result.stderr
        assert not target.exists()
    result = dk.run("restore", "--pgdata", str(target), "--target-lsn", "FF/0")
    assert result.exit_code == 16 and "past the end of the archived WAL" in result.stderr
    assert not target.exists()


def test_gap_in_archive_is_refused(pg: PgCluster, workdir: Path) -> None:
    dk = archiving_ledger(pg, workdir)
    dk.ok("backup")
    names = []
    for batch in range(3):
        write_batch(pg, batch)
        names.append(switch_wal(pg))
    wait_archived(pg, names[-1])
    lost = dk.repo_path / "wal" / names[1][:8] / names[1]
    lost.unlink()
    result = dk.run("restore", "--pgdata", str(workdir / "never"), "--target-latest")
    assert result.exit_code == 16, result.output
    assert f"WAL segment '{names[1]}' is missing from the archive" in result.stderr


def test_new_timeline_after_pitr_backs_up_and_recovers_again(pg: PgCluster, workdir: Path) -> None:
    dk = archiving_ledger(pg, workdir)
    _, between = backup_between_batches(dk)
    archive_everything(pg)
    pg.stop()  # the old primary is gone; the PITR copy takes over, archiving into the repository

    promoted = restore_to(
        dk, workdir, "promoted", "--target-time", between, "--archive-mode", "preserve", conf=None
    )
    assert promoted.psql("SELECT max(batch) FROM ledger") == "2"
    assert promoted.psql("SELECT timeline_id FROM pg_control_checkpoint()") == "2"
    (workdir / "new").mkdir(mode=0o755)
    new = Drkit(promoted, workdir / "new", keyfile=dk.keyfile, repo=dk.repo_path)
    enable_archiving(promoted, new)

    write_batch(promoted, 5)
    result = new.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "full"
    assert "the cluster is on timeline 2" in result.stderr
    write_batch(promoted, 6)
    # an incr on the new timeline (on 15 its blocks read from timeline 2's WAL): the PITR
    # below starts from it
    incr = json.loads(new.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr" and incr["notice"] is None, incr
    after_batch_6 = database_checksums(promoted)
    between = now(promoted)
    write_batch(promoted, 7)
    archive_everything(promoted)
    info = new.info()
    assert [t["timeline"] for t in info["wal"]] == [1, 2]

    again = restore_to(new, workdir, "second-pitr", "--target-time", between)
    assert database_checksums(again) == after_batch_6
    assert again.psql("SELECT timeline_id FROM pg_control_checkpoint()") == "3"


def test_restore_from_the_surviving_repository_fetches_wal_from_it_alone(
    pg: PgCluster, workdir: Path
) -> None:
    second = workdir / "second"
    dk = archiving_ledger(
        pg, workdir, extra_repos=[{"name": "second", "path": second, "offsite": True}]
    )
    after_batch_2, between = backup_between_batches(dk)
    archive_everything(pg)
    dk.ok("replicate")
    chown_to_server_user(second, recursive=True)  # the restored server's wal-fetch reads it
    shutil.rmtree(dk.repo_path)  # the primary site is lost; drkit.toml still lists it

    restored = restore_to(dk, workdir, "from-second", "--repo", "second", "--target-time", between)

    # Recovery went through the archived WAL to the target (a wal-fetch asking the lost
    # repository too would have stopped it with exit 222) and holds exactly batches 1 and 2
    assert database_checksums(restored) == after_batch_2
    auto_conf = (restored.pgdata / "postgresql.auto.conf").read_text()
    assert " wal-fetch --prefetch --config " in auto_conf and " --repo second %f %p" in auto_conf
    assert 'restored log file "' in restored.log_tail(200)
