"""Remote diff/incr on PostgreSQL 15 and 16: the data directory read over SQL (pg_backup_start,
pg_ls_dir/pg_stat_file, pg_read_binary_file at the blocks the WAL names), stored as drkit's own
page deltas. A chain restores, starts and holds every table as the source did; a chain mixing
local and remote members restores; a missing grant is named; a fall-back says why."""

from __future__ import annotations

import json
from pathlib import Path

from rig.postgres import PgFactory, database_checksums
from test_remote import BACKUP_ROLE, create_backup_role, remote, restore_and_compare
from test_remote_incremental import CHANGES, TABLES, _backup, _entries, _remote_dk

from drkit.pg.remote_files import FILE_FUNCTIONS

# Fewer updated rows than the 18 test's: blocks read one by one, not the whole file (scan_fraction)
SCATTERED = CHANGES.replace("id % 100 = 0", "id % 1000 = 0")


def test_remote_incr_and_diff_on_15_read_only_the_changed_blocks(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(15)
    pg.psql(TABLES)
    pg.psql(f"CREATE TABLESPACE fast LOCATION '{pg.make_tablespace_dir('fast')}'")
    pg.psql(
        "CREATE TABLE hot TABLESPACE fast AS SELECT g, md5(g::text) FROM generate_series(1, 9000) g"
    )
    pg.psql("CREATE UNLOGGED TABLE scratch AS SELECT g FROM generate_series(1, 5000) g")
    dk = _remote_dk(pg, workdir)
    full = _backup(dk, "full")
    hot = pg.psql("SELECT pg_relation_filepath('hot')")
    scratch = pg.psql("SELECT pg_relation_filepath('scratch')")
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    shrinking = pg.psql("SELECT pg_relation_filepath('shrinking')")
    pg.psql(SCATTERED)
    pg.psql("UPDATE hot SET md5 = 'x' WHERE g = 4000")
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
    assert scratch not in entries and f"{scratch}_init" in entries  # unlogged: its init fork
    moved = entries[hot]  # listed in its tablespace, stored as a delta of the full
    assert hot.startswith("pg_tblspc/") and moved.pages and moved.base == full["label"]

    pg.psql("UPDATE accounts SET balance = balance + 2 WHERE id % 1000 = 1")
    pg.psql("INSERT INTO shrinking SELECT g, 'back' FROM generate_series(1, 300) g")
    diff = _backup(dk, "diff")
    assert diff["type"] == "diff" and diff["parent"] == full["label"], diff
    # a chain mixing the engines: the local one on the remote diff, a remote incr on it
    pg.psql("UPDATE accounts SET balance = 7 WHERE id % 500 = 3; DROP TABLE fresh")
    dk.write_config()  # local mode, on the database host
    local = _backup(dk, "incr")
    assert local["type"] == "incr" and local["parent"] == diff["label"], local
    pg.psql("UPDATE accounts SET balance = 8 WHERE id % 700 = 5; CREATE TABLE late (x int)")
    remote(dk)
    last = _backup(dk, "incr")
    assert last["type"] == "incr" and last["parent"] == local["label"], last
    # the local member's files that did not change are referenced, not read again
    assert sum(e.backup != last["label"] for e in _entries(dk, last["label"]).values()) > 100
    dk.ok("verify")
    mapping = f"fast={workdir / 'fast-restored'}"
    restored = restore_and_compare(dk, workdir, database_checksums(pg), "--tablespace-map", mapping)
    assert restored.psql("SELECT count(*) FROM shrinking") == "5300"
    assert restored.psql("SELECT count(*) FROM scratch") == "0"


def test_remote_incr_on_16_reads_the_changed_blocks_over_sql(
    pg_factory: PgFactory, workdir: Path
) -> None:
    """16, like 15, has no WAL summaries: the same SQL path, end to end."""
    pg = pg_factory(16)
    pg.psql(TABLES)
    dk = _remote_dk(pg, workdir)
    full = _backup(dk, "full")
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    pg.psql(SCATTERED)
    incr = _backup(dk, "incr")
    assert incr["parent"] == full["label"] and incr["stats"]["changes"] == "wal", incr
    updated = _entries(dk, incr["label"])[accounts]
    assert updated.pages is not None and updated.base == full["label"]
    assert 0 < sum(end - start for start, end in updated.pages) < updated.size // 8192 // 2
    restore_and_compare(dk, workdir, database_checksums(pg))


def test_remote_incr_on_15_names_missing_grants_checks_pages_and_falls_back(
    pg_factory: PgFactory, workdir: Path
) -> None:
    """The role docs/remote.md documents: a full needs REPLICATION only (init notes the rest), a
    diff/incr before 17 names each function it lacks (exit 41), and with them takes the incr.
    Without the WAL since the parent (neither archived nor still in pg_wal), the changed files
    are read whole, and the notice says so; a page damaged after it changed is reported as in
    local mode (warning 101, bad_pages)."""
    pg = pg_factory(15, {"wal_keep_size": 0})
    pg.psql(TABLES)
    create_backup_role(pg)
    dk = _remote_dk(pg, workdir)
    remote(dk, user=BACKUP_ROLE)
    init = dk.ok("init")
    assert "notice: diff and incr backups will stop with exit 41" in init.stdout
    full = _backup(dk, "full")
    pg.psql(SCATTERED)
    refused = dk.run("backup", "--type", "incr")
    assert refused.exit_code == 41, refused.output
    for function in FILE_FUNCTIONS:
        assert f"EXECUTE on function {function} (GRANT EXECUTE" in refused.output
    assert "REPLICATION attribute" not in refused.output

    pg.psql(f"GRANT EXECUTE ON FUNCTION {', '.join(FILE_FUNCTIONS)} TO {BACKUP_ROLE}")
    assert "exit 41" not in dk.ok("init").stdout
    for _ in range(2):  # the WAL since the full leaves pg_wal
        pg.psql("SELECT pg_switch_wal(); CHECKPOINT")
    # a row on page 3 changed (a new LSN), then that page's tuples damaged on disk
    pg.psql("UPDATE emptied SET g = 0; INSERT INTO emptied SELECT generate_series(1, 2000)")
    pg.psql("UPDATE emptied SET g = -1 WHERE ctid = '(3,1)'; CHECKPOINT")
    relpath = pg.psql("SELECT pg_relation_filepath('emptied')")
    pg.stop()
    with (pg.pgdata / relpath).open("r+b") as f:
        f.seek(8192 * 3 + 6000)
        f.write(b"\xde\xad\xbe\xef")
    pg.start()
    result = dk.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 101, result.output  # PageChecksumFailure
    assert f"page checksum failure in '{relpath}' block 3" in result.stderr
    incr = json.loads(result.stdout)
    assert incr["type"] == "incr" and incr["parent"] == full["label"], incr
    assert incr["stats"]["changes"] == "scan"
    assert "is neither in pg_wal nor in the archive" in incr["notice"]
    assert "reading changed relation files whole" in incr["notice"]
    assert _entries(dk, incr["label"])[relpath].bad_pages == [3]
    dk.ok("verify")
