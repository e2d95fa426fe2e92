"""diff/incr without the server's WAL summaries (PostgreSQL 15-16, or summarize_wal off): drkit
reads the WAL since the parent for the blocks that changed (drkit/pg/walblocks.py, _walblocks.c).

What it reads is checked against pg_waldump, reference by reference, on both versions; WAL that
does not check out (damaged, recycled, another system's, wal_level minimal for a while) or is
missing makes the backup scan changed files whole and say why; the archive serves the segments
pg_wal no longer has."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from test_incremental import _restore_and_compare

from drkit.backup import plan
from drkit.config.settings import load_settings
from drkit.pg.constants import PAGE_SIZE
from drkit.pg.summaries import ChangedBlocks, NoSummaries
from drkit.pg.wal import format_lsn, parse_lsn, segment_name, segments_between
from drkit.pg.walblocks import SegmentSource, wal_changed_blocks
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry
from drkit.repo.open import open_repository
from drkit.repo.wal_names import parse_wal_name

SEGMENT = 16 * 1024 * 1024
DEFAULT_TABLESPACE = 1663


def _lsn(pg: PgCluster, sql: str) -> int:
    return parse_lsn(pg.psql(sql))


def _until(pg: PgCluster) -> int:
    """Checkpoint; the redo LSN a backup starting now would have."""
    pg.psql("CHECKPOINT")
    return _lsn(pg, "SELECT redo_lsn FROM pg_control_checkpoint()")


def _pg_wal(pg: PgCluster) -> SegmentSource:
    return plan.pg_wal_segments(pg.pgdata / "pg_wal")


def _scan(
    pg: PgCluster,
    since: int,
    until: int,
    sources: list[SegmentSource] | None = None,
    *,
    major: int | None = None,
    system_identifier: int | None = None,
) -> ChangedBlocks:
    sysid = int(pg.psql("SELECT system_identifier FROM pg_control_system()"))
    return wal_changed_blocks(
        sources or [_pg_wal(pg)],
        major or pg.version,
        sysid if system_identifier is None else system_identifier,
        1,
        since,
        until,
        SEGMENT,
    )


def _blocks(changed: ChangedBlocks) -> set[tuple[tuple[int, int, int], int]]:
    return {
        (key, block)
        for key, (starts, ends) in changed.ranges.items()
        for start, end in zip(starts, ends, strict=True)
        for block in range(start, end)
    }


def _waldump_blocks(pg: PgCluster, since: int, until: int) -> set[tuple[tuple[int, int, int], int]]:
    """Every main-fork block reference pg_waldump prints for the records in [since, until)."""
    out = pg.run_bin(
        "pg_waldump", "-p", str(pg.pgdata / "pg_wal"), "-s", format_lsn(since), "-e",
        format_lsn(until),
    ).stdout  # fmt: skip
    refs = re.finditer(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk (\d+)", out)
    return {((int(m[1]), int(m[2]), int(m[3])), int(m[5])) for m in refs if m[4] in (None, "main")}


def _key(pg: PgCluster, table: str) -> tuple[int, int, int]:
    db, rel = pg.psql(
        f"SELECT d.oid, pg_relation_filenode('{table}') FROM pg_database d"
        " WHERE datname = current_database()"
    ).split("|")
    return (DEFAULT_TABLESPACE, int(db), int(rel))


def test_blocks_and_limits_are_those_the_wal_records_name(pg: PgCluster) -> None:
    """With compressed full-page images (wal_compression), which add a field to block headers."""
    pg.set_conf({"wal_compression": "pglz"})
    pg.reload()
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    pg.psql(
        "CREATE TABLE shrinks AS"
        " SELECT g AS id, repeat('s', 300) AS pad FROM generate_series(1, 20000) g"
    )
    pg.psql("CREATE TABLE doomed AS SELECT generate_series(1, 1000) AS x")
    pg.psql("VACUUM FREEZE")
    since = _lsn(pg, "SELECT pg_current_wal_insert_lsn()")
    shrinks, doomed = _key(pg, "shrinks"), _key(pg, "doomed")

    pg.run_bin("pgbench", "-n", "-t", "300", "-c", "2")
    pg.psql("DELETE FROM shrinks WHERE id > 5000")
    pg.psql("VACUUM shrinks")  # truncated: a limit block
    pg.psql("DROP TABLE doomed")  # dropped at commit: limit 0
    pg.psql("CREATE TABLE born AS SELECT generate_series(1, 5000) AS n")
    pg.psql("CREATE INDEX ON born (n)")
    born = _key(pg, "born")
    pg.psql("CREATE DATABASE made")  # WAL_LOG: its blocks are logged, the database marked too
    pg.psql("CREATE DATABASE copied STRATEGY FILE_COPY")  # copied without logging its blocks
    made, copied = (
        int(pg.psql(f"SELECT oid FROM pg_database WHERE datname = '{name}'"))
        for name in ("made", "copied")
    )
    pg.psql("DROP DATABASE made")
    until = _until(pg)

    changed = _scan(pg, since, until)
    assert _blocks(changed) == _waldump_blocks(pg, since, until)
    assert len(_blocks(changed)) > 1000  # pgbench touched many
    shrunk = int(pg.psql("SELECT pg_relation_size('shrinks')")) // PAGE_SIZE
    assert 0 < shrunk < 300
    assert changed.limits[shrinks] == shrunk
    assert changed.limits[doomed] == 0
    assert changed.limits[born] == 0
    assert changed.limits[(DEFAULT_TABLESPACE, made, 0)] == 0
    assert changed.limits[(DEFAULT_TABLESPACE, copied, 0)] == 0
    assert _key(pg, "pgbench_accounts") not in changed.limits
    # what a delta of a file of the copied database reads: all of it
    assert changed.segment_reads((DEFAULT_TABLESPACE, copied, 1259), 0, 10) is None
    # records before `since` are read (to follow the chain) but not gathered
    later = _scan(pg, _lsn(pg, "SELECT pg_current_wal_insert_lsn()"), _until(pg))
    assert not _blocks(later) - _blocks(changed) and len(_blocks(later)) < 100


def test_wal_that_does_not_check_out_is_refused(pg: PgCluster) -> None:
    since = _lsn(pg, "SELECT pg_current_wal_insert_lsn()")
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")  # ~30 MB of WAL: more than one segment
    until = _until(pg)
    names = segments_between(1, since, until, SEGMENT)
    assert len(names) >= 2
    good = _pg_wal(pg)
    assert _blocks(_scan(pg, since, until))

    def served(swap: dict[str, bytes]) -> list[SegmentSource]:
        return [lambda name: swap.get(name, good(name))]

    # a segment neither source has
    with pytest.raises(NoSummaries, match=f"{names[1]} is neither in pg_wal nor in the archive"):
        _scan(pg, since, until, [lambda name: None if name == names[1] else good(name)])
    # damaged: bytes in the middle of the first segment flipped
    data = bytearray(good(names[0]) or b"")
    middle = (since % SEGMENT + SEGMENT) // 2
    data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
    with pytest.raises(NoSummaries, match=f"WAL segment {names[0]} cannot be read: "):
        _scan(pg, since, until, served({names[0]: bytes(data)}))
    # a recycled file: another segment's WAL under this name
    with pytest.raises(NoSummaries, match="is not that page of this server's WAL"):
        _scan(pg, since, until, served({names[1]: good(names[0]) or b""}))
    # another database system's WAL, another major version's
    with pytest.raises(NoSummaries, match="belongs to another database system"):
        _scan(pg, since, until, system_identifier=12345)
    with pytest.raises(NoSummaries, match="not that page"):
        _scan(pg, since, until, major=16 if pg.version != 16 else 15)
    with pytest.raises(NoSummaries, match="reads the WAL of PostgreSQL 13 to 18, not of 12"):
        _scan(pg, since, until, major=12)


def test_a_stretch_of_wal_level_minimal_is_refused(pg: PgCluster) -> None:
    since = _lsn(pg, "SELECT pg_current_wal_insert_lsn()")
    pg.stop()
    minimal = {"wal_level": "minimal", "max_wal_senders": 0, "archive_mode": "off"}
    pg.set_conf({**minimal, "summarize_wal": False} if pg.version >= 17 else minimal)
    pg.start()
    pg.psql("CREATE TABLE quiet AS SELECT generate_series(1, 100) AS n")  # not WAL-logged
    pg.stop()
    pg.set_conf({"wal_level": "replica", "max_wal_senders": 4})
    pg.start()
    with pytest.raises(NoSummaries, match="wal_level was minimal for a while"):
        _scan(pg, since, _until(pg))


def _entries(dk: Drkit, label: str) -> dict[str, FileEntry]:
    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return {f.path: f for f in manifest.files}


def test_incr_reads_the_archived_wal_pg_wal_no_longer_has(pg: PgCluster, workdir: Path) -> None:
    """And when an archived segment is damaged, the next backup scans instead, saying so."""
    pg.set_conf({"wal_keep_size": 0, "min_wal_size": "32MB", "max_wal_size": "64MB"})
    dk = Drkit(pg, workdir, backup={"wal_summaries": False})  # 18 too: read the WAL
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.run_bin("pgbench", "-i", "-s", "3", "-q")
    pg.psql("VACUUM FREEZE")
    accounts = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    full = json.loads(dk.ok("backup", "--json").stdout)
    first = segment_name(1, parse_lsn(full["start_lsn"]) // SEGMENT, SEGMENT)
    time.sleep(2.1)  # past the mtime safety margin

    pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN 1001 AND 3000")
    pg.psql(
        "INSERT INTO pgbench_accounts SELECT g, 1, 0, 'new' FROM generate_series(300001, 301000) g"
    )
    for _ in range(6):  # until the checkpoints have removed or recycled the full's segment
        wait_archived(pg, switch_wal(pg))
        pg.psql("CHECKPOINT")
        if not (pg.pgdata / "pg_wal" / first).exists():
            break
    assert not (pg.pgdata / "pg_wal" / first).exists()
    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["notice"] is None and incr["stats"]["changes"] == "wal", incr
    assert dk.info()["backups"][-1]["changes"] == "wal"
    delta = _entries(dk, incr["label"])[accounts]
    assert delta.sha256 is None  # the WAL's blocks, not a scan
    assert delta.pages is not None and 0 < len(delta.pages) < 100
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)

    # A diff (since the full) needs that segment again: damaged in the archive, it is refused
    # with the reason, and the diff scans the changed files instead
    stored = dk.repo_path / parse_wal_name(first).key
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    diff = json.loads(dk.ok("backup", "--type", "diff", "--json").stdout)
    assert f"archived WAL segment {first} cannot be read" in diff["notice"], diff
    assert "reading changed relation files whole" in diff["notice"]
    assert diff["stats"]["changes"] == "scan"
    assert _entries(dk, diff["label"])[accounts].sha256 is not None
    _restore_and_compare(dk, pg, workdir, diff["label"], database_checksums(pg))


def test_wal_much_larger_than_the_changed_files_is_not_read(
    pg: PgCluster, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanning the changed files costs less then (here past 0 bytes, not 1 GiB, of WAL)."""
    monkeypatch.setattr(plan, "WAL_SCAN_FREE", 0)
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    pg.psql("CHECKPOINT")
    dk = Drkit(pg, workdir, backup={"wal_summaries": False})
    dk.ok("init")
    time.sleep(2.1)  # the full starts past the mtime safety margin of pgbench's files
    dk.ok("backup")
    time.sleep(2.1)
    for _ in range(4):  # each copies template1 into the WAL (~8 MB), changing few files
        pg.psql("CREATE DATABASE passing")
        pg.psql("DROP DATABASE passing")
    pg.psql("UPDATE pgbench_branches SET bbalance = 1")
    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert re.search(
        r"the WAL since the parent \(\d+ MiB\) outweighs the relation files that changed"
        r" \(\d+ MiB\): reading changed relation files whole",
        incr["notice"],
    ), incr
    branches = pg.psql("SELECT pg_relation_filepath('pgbench_branches')")
    assert _entries(dk, incr["label"])[branches].sha256 is not None  # scanned whole
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)
