"""Objects added to a write-once repository (what someone who can only add objects — Object Lock
forbids the rest — can do) do not make the backups or the WAL archive unreadable: every key
record is tried until one opens what it should, unauthentic manifests are passed over by
restore, by the choice of a parent and by prune, and reported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rig.archive import switch_wal
from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from rig.vault import backup_label, restore_and_compare

from drkit.errors import BackupSkipped

BOGUS = "20991231-000000F"  # sorts after every genuine label: the "latest" backup


def _segment(pg: PgCluster) -> Path:
    """A segment just finished (something written, then switched), still in pg_wal."""
    return pg.pgdata / "pg_wal" / switch_wal(pg)


def test_added_objects_leave_backups_and_wal_readable(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    dk = Drkit(pg, workdir)
    dk.write_config(retention={"full": 1})
    dk.ok("init")
    first = backup_label(dk, "--type", "full")
    first_data = database_checksums(pg)
    pg.psql("INSERT INTO t SELECT g FROM generate_series(5001, 6000) g")
    second = backup_label(dk, "--type", "full")
    segment = _segment(pg)
    dk.ok("wal-push", str(segment))

    repo = dk.repo_path
    genuine_record = repo / "backup" / second / "key" / "0001.json"
    [period] = [p.name for p in (repo / "wal-keys").iterdir()]
    # 1. A newer key record for the first backup: a genuine record, of another backup's DEK.
    shutil.copy(genuine_record, repo / "backup" / first / "key" / "0002.json")
    # 2. The same for the WAL key period.
    shutil.copy(genuine_record, repo / "wal-keys" / period / "0002.json")
    # 3. A newest "backup" whose manifest nobody with the key sealed.
    (repo / "backup" / BOGUS / "key").mkdir(parents=True)
    shutil.copy(genuine_record, repo / "backup" / BOGUS / "key" / "0001.json")
    (repo / "backup" / BOGUS / "manifest").write_bytes(os.urandom(4096))

    # The first backup restores, with its own data.
    restore_and_compare(dk, first, workdir / "first", first_data)

    # The default restore passes over the bogus "latest" and says so.
    result = dk.run("restore", "--pgdata", str(workdir / "latest"))
    assert result.exit_code == BackupSkipped.exit_code, result.output
    assert f"restored backup {second} from 'local'" in result.stdout
    assert f"warning: backup '{BOGUS}' skipped" in result.stderr

    # The archived segment is fetched intact.
    fetched = workdir / "fetched"
    dk.ok("wal-fetch", segment.name, str(fetched))
    assert fetched.read_bytes() == segment.read_bytes()

    # An incremental backup is based on the newest genuine backup, not taken as a full.
    backup = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert backup["label"].startswith(f"{second}_") and backup["label"].endswith("I")
    assert f"backup '{BOGUS}' skipped as a parent" in backup["notice"]

    # Prune keeps the newest genuine full and its incr, deletes the first, and never counts
    # nor deletes the bogus one.
    result = dk.run("prune", "--json")
    assert result.exit_code == BackupSkipped.exit_code, result.output
    [report] = json.loads(result.stdout)["repos"]
    assert report["deleted"] == [first]
    assert [u["label"] for u in report["unreadable"]] == [BOGUS]
    assert f"backup '{BOGUS}' was left out of retention and kept" in result.stdout
    assert (repo / "backup" / BOGUS / "manifest").exists()
    assert (repo / "backup" / second / "manifest").exists()
