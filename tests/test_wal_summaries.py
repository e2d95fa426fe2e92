"""diff/incr from PostgreSQL's WAL summaries (17+, summarize_wal = on): only changed blocks read.

The rig turns summarize_wal on for PostgreSQL 18, so every diff/incr test on 18 (the DDL chain
in test_incremental.py among them) takes this path; these tests check what is particular to it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster, PgFactory, database_checksums
from test_incremental import _restore_and_compare

from drkit.backup.copy import _ReadAhead
from drkit.backup.plan import READ_CHUNK, read_batches
from drkit.pg import summaries
from drkit.pg.constants import PAGE_SIZE, RELSEG_PAGES
from drkit.pg.pages import page_runs, relation_key
from drkit.pg.summaries import (
    ChangedBlocks,
    NoSummaries,
    changed_blocks,
    check_coverage,
)
from drkit.repo.manifest import FileEntry


def test_relation_key_of_main_fork_files_only() -> None:
    assert relation_key("base/5/16384") == (1663, 5, 16384)
    assert relation_key("base/5/16384.2") == (1663, 5, 16384)
    assert relation_key("global/1262") == (1664, 0, 1262)
    assert relation_key("pg_tblspc/16400/PG_18_202506291/5/16401.1") == (16400, 5, 16401)
    for other in ("base/5/16384_fsm", "base/5/16384_vm", "base/5/PG_VERSION", "pg_xact/0000"):
        assert relation_key(other) is None


def test_segment_reads_clip_to_the_segment_and_honour_limit_blocks() -> None:
    rel, other, created = (1663, 5, 1), (1663, 5, 2), (1663, 5, 3)
    changed = ChangedBlocks.of(
        ranges={rel: [(3, 5), (RELSEG_PAGES - 1, RELSEG_PAGES + 2)], other: [(0, 1)]},
        limits={other: RELSEG_PAGES + 10, created: 0},
    )
    first = changed.segment_reads(rel, 0, parent_blocks=RELSEG_PAGES)
    assert first is not None
    assert first.spans(RELSEG_PAGES) == [(3, 5), (RELSEG_PAGES - 1, RELSEG_PAGES)]
    second = changed.segment_reads(rel, 1, parent_blocks=100)
    assert second is not None
    # blocks 0-1 of segment 1 changed; 100.. are past the parent's end; the file has 150 now
    assert second.spans(150) == [(0, 2), (100, 150)]
    # blocks past the parent's end that the summaries name only in part (a bulk extension
    # writes no WAL for the empty pages): the whole tail is read all the same
    grown = ChangedBlocks.of(ranges={rel: [(2, 3), (578, 590)]}, limits={})
    tail = grown.segment_reads(rel, 0, parent_blocks=551)
    assert tail is not None and tail.spans(590) == [(2, 3), (551, 590)]
    # truncated to RELSEG_PAGES + 10 within the range: segment 1 is read from block 10 on
    truncated = changed.segment_reads(other, 1, parent_blocks=500)
    assert truncated is not None and truncated.spans(600) == [(10, 600)]
    # created (limit 0) or truncated below this segment: the whole file is scanned
    assert changed.segment_reads(created, 0, parent_blocks=7) is None
    assert changed.segment_reads(other, 2, parent_blocks=7) is None
    # untouched: nothing but growth
    untouched = changed.segment_reads((1663, 5, 9), 0, parent_blocks=40)
    assert untouched is not None and untouched.spans(40) == [] and untouched.spans(42) == [(40, 42)]
    # the share of the parent's blocks that changed (what decides to read a file whole anyway):
    # growth past the parent's end does not count, truncation shrinks what does
    assert first.rewritten(RELSEG_PAGES) == 3 / RELSEG_PAGES
    assert tail.rewritten(590) == 1 / 551
    assert truncated.rewritten(600) == 0 and untouched.rewritten(42) == 0
    assert ChangedBlocks.of({rel: [(0, 4)]}, {}).segment_reads(rel, 0, 8).rewritten(8) == 0.5


def test_changed_blocks_are_compact_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        (1663, 5, 1, False, 0, 2),
        (1663, 5, 1, False, 10, 12),
        (1663, 5, 1, True, 40, None),
        (1663, 5, 2, False, 7, 8),
    ]
    changed = changed_blocks(rows)
    assert changed.limits == {(1663, 5, 1): 40}
    assert [list(a) for a in changed.ranges[(1663, 5, 1)]] == [[0, 10], [2, 12]]
    reads = changed.segment_reads((1663, 5, 1), 0, parent_blocks=20)
    assert reads is not None and reads.spans(30) == [(0, 2), (10, 12), (20, 30)]
    monkeypatch.setattr(summaries, "MAX_RANGES", 2)  # memory stays bounded: past it, scan
    with pytest.raises(NoSummaries, match="more than 2 changed block ranges"):
        changed_blocks(rows)


def test_read_batches_join_close_ranges_split_long_ones_and_fill_buffers() -> None:
    per_read = READ_CHUNK // PAGE_SIZE
    batches = read_batches([(0, 1), (5, 6), (100, 101), (200, 200 + per_read + 3)])
    assert batches == [
        [(0, 6 * PAGE_SIZE), (100 * PAGE_SIZE, PAGE_SIZE)],  # 0 and 5 are close: one read
        [(200 * PAGE_SIZE, READ_CHUNK)],  # too long for the first buffer's room
        [((200 + per_read) * PAGE_SIZE, 3 * PAGE_SIZE)],
    ]


def test_gathered_pages_keep_their_block_numbers(workdir: Path) -> None:
    """Pages read from several places of a file into one buffer: each keeps its block number,
    and runs of pages to store never join pages that are not neighbours in the file."""
    path = workdir / "relation"
    path.write_bytes(b"".join(bytes([block]) * PAGE_SIZE for block in range(40)))
    batches = read_batches([(3, 5), (20, 21), (22, 24)])  # 20 and 22 are close: read 20-23
    with (
        path.open("rb", buffering=0) as stream,
        ThreadPoolExecutor(1) as readers,
        _ReadAhead(
            stream, readers, [memoryview(bytearray(READ_CHUNK)) for _ in range(2)], batches
        ) as chunks,
    ):
        [(blocks, chunk)] = [(b, bytes(c)) for b, c in chunks]
    assert blocks.tolist() == [3, 4, 20, 21, 22, 23]
    assert [chunk[i * PAGE_SIZE] for i in range(len(blocks))] == blocks.tolist()
    wanted = np.array([True, True, True, False, True, True])
    assert page_runs(wanted, blocks) == [(0, 3, 5), (2, 20, 21), (4, 22, 24)]


def test_summaries_must_cover_the_whole_range() -> None:
    check_coverage([(10, 50), (50, 90)], since=20, until=90)
    check_coverage([(0, 200)], since=20, until=90)
    with pytest.raises(NoSummaries, match=r"do not cover 0/1E\.\.0/5A"):
        check_coverage([(10, 30), (40, 90)], since=20, until=90)  # a gap
    with pytest.raises(NoSummaries):
        check_coverage([(30, 90)], since=20, until=90)  # starts after the parent
    with pytest.raises(NoSummaries):
        check_coverage([(10, 80)], since=20, until=90)  # not up to this backup's start


def _entries(dk: Drkit, label: str) -> dict[str, FileEntry]:
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupLabel
    from drkit.repo.open import open_repository

    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return {f.path: f for f in manifest.files}


def _pages(entry: FileEntry) -> set[int]:
    assert entry.pages is not None, entry
    return {block for start, end in entry.pages for block in range(start, end)}


def test_incr_reads_the_summarized_blocks_and_restores(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(18)
    pg.run_bin("pgbench", "-i", "-s", "3", "-q")
    pg.psql(
        "CREATE TABLE shrinks AS SELECT g AS id, repeat('s', 200) AS pad"
        " FROM generate_series(1, 20000) g"
    )
    pg.psql(
        "CREATE TABLE churned AS SELECT g AS id, 0 AS n, repeat('c', 100) AS pad"
        " FROM generate_series(1, 20000) g"
    )
    pg.psql("VACUUM ANALYZE")
    accounts = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    shrinks = pg.psql("SELECT pg_relation_filepath('shrinks')")
    churned = pg.psql("SELECT pg_relation_filepath('churned')")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    time.sleep(2.1)  # past the mtime safety margin: files differ only by the changes below

    pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN 1001 AND 3000")
    pg.psql(
        "INSERT INTO pgbench_accounts SELECT g, 1, 0, 'new' FROM generate_series(300001, 301000) g"
    )
    # shrinks is truncated by VACUUM (a limit block in the summary), then grows again
    pg.psql("DELETE FROM shrinks WHERE id > 5000")
    pg.psql("VACUUM shrinks")
    pg.psql("INSERT INTO shrinks SELECT g, repeat('t', 200) FROM generate_series(5001, 9000) g")
    pg.psql("UPDATE churned SET n = n + 1 WHERE id % 3 = 0")  # every page of it
    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr" and incr["notice"] is None, incr

    # The same changes seen by a page scan (a diff on the same full, without summaries)
    dk.backup.update(wal_summaries=False, wal_scan=False)
    dk.write_config()
    diff = json.loads(dk.ok("backup", "--type", "diff", "--json").stdout)["label"]
    by_summary, by_scan = _entries(dk, incr["label"]), _entries(dk, diff)
    for path in (accounts, shrinks):
        summarized, scanned = by_summary[path], by_scan[path]
        # read from the summaries: no whole-file checksum; read whole: one
        assert summarized.sha256 is None and scanned.sha256 is not None
        assert summarized.size == scanned.size
        # the summary incr stored nothing the scan would not (the scan ran later: it may find
        # more, e.g. hint bits set by the checksums query); that it missed nothing, the restore
        # below shows
        assert _pages(summarized) and _pages(summarized) <= _pages(scanned), path
    assert len(_pages(by_summary[accounts])) < by_summary[accounts].size // PAGE_SIZE // 5
    # most of its blocks changed (backup.scan_fraction, 10%): read whole all the same, stored as
    # XOR deltas with a whole-file checksum
    assert by_summary[churned].sha256 is not None and by_summary[churned].xor
    assert dk.run("verify").exit_code == 0
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)


def test_summaries_that_miss_the_parent_fall_back_to_the_page_scan(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg: PgCluster = pg_factory(18, {"summarize_wal": False, "wal_keep_size": 0})
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    # changed before the summarizer starts (at the latest checkpoint): no summary has these
    pg.psql("UPDATE pgbench_accounts SET abalance = 4 WHERE aid > 190000")
    pg.psql("CHECKPOINT")
    pg.psql("ALTER SYSTEM SET summarize_wal = on")
    pg.psql("SELECT pg_reload_conf()")
    pg.psql("UPDATE pgbench_accounts SET abalance = 5 WHERE aid <= 3000")
    expected = database_checksums(pg)
    result = dk.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 0, result.output
    incr = json.loads(result.stdout)
    assert incr["type"] == "incr"
    assert "WAL summaries do not cover" in incr["notice"], incr
    assert "reading changed relation files whole" in result.stderr
    accounts = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    assert _entries(dk, incr["label"])[accounts].sha256 is not None  # scanned whole
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)


def test_too_many_changed_ranges_fall_back_to_the_page_scan(
    pg_factory: PgFactory, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_RANGES the summaries are dropped half-read (the query is cancelled) and the
    same session goes on to scan and finish the backup."""
    pg = pg_factory(18)
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    pg.psql("UPDATE pgbench_accounts SET abalance = 9 WHERE aid % 50 = 0")
    expected = database_checksums(pg)
    monkeypatch.setattr(summaries, "MAX_RANGES", 3)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert "more than 3 changed block ranges" in incr["notice"], incr
    accounts = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    assert _entries(dk, incr["label"])[accounts].sha256 is not None  # scanned whole
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)
