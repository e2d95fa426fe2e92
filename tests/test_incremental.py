"""Differential and incremental backups: a chain with churn and DDL, each member restored."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from rig.drkit import Drkit, check_indexes, start_restored
from rig.postgres import PgCluster, database_checksums

from drkit.backup.file_writers import changed_pages
from drkit.backup.plan import Delta
from drkit.errors import DataChecksumsOff
from drkit.pg.pages import PAGE_SIZE


def _page(lsn: int, upper: int = 100) -> bytes:
    page = bytearray(PAGE_SIZE)
    page[0:4] = (lsn >> 32).to_bytes(4, "little")
    page[4:8] = (lsn & 0xFFFFFFFF).to_bytes(4, "little")
    page[14:16] = upper.to_bytes(2, "little")
    page[200:210] = b"x" * 10
    return bytes(page)


def test_changed_pages_selects_new_lsns_zero_pages_and_growth() -> None:
    chunk = b"".join(
        [_page(50), _page(150), _page(10, upper=0), _page(99), _page(100), _page(1), _page(1)]
    )
    zeroed = bytearray(chunk)
    zeroed[2 * PAGE_SIZE : 3 * PAGE_SIZE] = bytes(PAGE_SIZE)
    delta = Delta(since_lsn=100, parent_size=5 * PAGE_SIZE, base="x")
    # block 1 (LSN 150), block 2 (new zero page), block 4 (LSN == since), 5-6 (past parent's end)
    assert changed_pages(memoryview(bytes(zeroed)), 0, delta) == [(1, 3), (4, 7)]
    # the same pages seen as blocks 10.. of a file: every block is past the parent's end
    assert changed_pages(memoryview(bytes(zeroed)), 10, delta) == [(10, 17)]
    # a trailing partial page is always stored
    assert changed_pages(memoryview(_page(1) + b"abc"), 0, delta) == [(1, 2)]
    assert changed_pages(memoryview(b""), 0, delta) == []


CHURN = [
    # after the full backup
    """
    UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 97 = 0;
    CREATE TABLE grows (id int, pad text);
    INSERT INTO grows SELECT g, repeat('g', 200) FROM generate_series(1, 5000) g;
    CREATE TABLE shrinks AS
      SELECT g AS id, repeat('s', 300) AS pad FROM generate_series(1, 20000) g;
    CREATE TABLE doomed AS SELECT generate_series(1, 1000) AS x;
    """,
    # after incr 1
    """
    INSERT INTO grows SELECT g, repeat('h', 200) FROM generate_series(5001, 30000) g;
    DELETE FROM shrinks WHERE id > 2000;
    VACUUM shrinks;
    DROP TABLE doomed;
    TRUNCATE pgbench_history;
    ALTER TABLE pgbench_branches SET TABLESPACE moved;
    """,
    # after incr 2
    """
    VACUUM FULL pgbench_tellers;
    UPDATE pgbench_accounts SET filler = md5(aid::text) WHERE aid BETWEEN 1000 AND 3000;
    CREATE DATABASE later;
    """,
    # after the diff
    """
    INSERT INTO grows SELECT g, 'late' FROM generate_series(30001, 31000) g;
    ALTER TABLE pgbench_branches SET TABLESPACE pg_default;
    UPDATE pgbench_accounts SET abalance = -1 WHERE aid = 1;
    """,
]
# Per database, run after the matching step of CHURN.
CHURN_IN_DB = [
    [
        ("postgres", "CREATE DATABASE early"),
        ("early", "CREATE TABLE e AS SELECT generate_series(1, 500) AS n"),
        ("postgres", "CREATE DATABASE roams"),
        ("roams", "CREATE TABLE r AS SELECT g AS id, 0 AS n FROM generate_series(1, 3000) g"),
        ("roams", "VACUUM FREEZE r"),  # hint bits set: reading r writes nothing from here on
    ],
    # roams moves away and back (its files copied whole, their blocks not in the WAL) and
    # changes while away (VACUUM sets the hint bits there, so nothing after the move back
    # writes to r): the same files as in the parent, with other contents
    [
        ("postgres", "ALTER DATABASE roams SET TABLESPACE moved"),
        ("roams", "UPDATE r SET n = n + 1 WHERE id % 2 = 0"),
        ("roams", "VACUUM r"),
        ("postgres", "ALTER DATABASE roams SET TABLESPACE pg_default"),
    ],
    [("postgres", "DROP DATABASE early")],
    [("later", "CREATE TABLE born_late AS SELECT generate_series(1, 777) AS n")],
]


def _restore_and_compare(
    dk: Drkit,
    pg: PgCluster,
    workdir: Path,
    label: str,
    expected: dict[str, dict[str, str]],
    tablespace: bool = False,
) -> None:
    target = workdir / f"restore-{label}"
    args = ["--tablespace-map", f"moved={workdir / ('ts-' + label)}"] if tablespace else []
    dk.ok("restore", "--pgdata", str(target), "--backup", label, *args)
    restored = start_restored(target, pg.version, workdir)
    try:
        assert database_checksums(restored) == expected, f"backup {label} restored wrong data"
        check_indexes(restored)
    finally:
        restored.stop()


@pytest.mark.slow
@pytest.mark.parametrize("changes", ["wal", "scan"])
def test_chain_full_incr_incr_diff_incr_restores_each_member(
    pg: PgCluster, workdir: Path, changes: str
) -> None:
    """changes="wal": diff/incr read the blocks the WAL names (the server's summaries on 17+,
    drkit reading pg_wal on 15); "scan": changed files read whole."""
    pg.run_bin("pgbench", "-i", "-s", "3", "-q")
    pg.psql(f"CREATE TABLESPACE moved LOCATION '{pg.make_tablespace_dir('moved')}'")
    from_wal = changes == "wal"
    found_by = ("summaries" if pg.version >= 17 else "wal") if from_wal else "scan"
    dk = Drkit(pg, workdir, backup={"wal_summaries": from_wal, "wal_scan": from_wal})
    dk.ok("init")

    taken: list[tuple[str, str, dict]] = []  # type: ignore[type-arg]
    kinds = ["full", "incr", "incr", "diff", "incr"]
    for step, kind in enumerate(kinds):
        result = json.loads(dk.ok("backup", "--type", kind, "--json").stdout)
        assert result["type"] == kind and result["notice"] is None, result
        assert result["stats"]["changes"] == (None if kind == "full" else found_by), result
        taken.append((result["label"], kind, database_checksums(pg)))
        if step == len(kinds) - 1:
            break
        pg.run_bin("pgbench", "-n", "-t", "300", "-c", "2")
        pg.psql(CHURN[step])
        for dbname, sql in CHURN_IN_DB[step]:
            pg.psql(sql, dbname=dbname)

    labels = [label for label, _, _ in taken]
    info = dk.info()
    by_label = {b["label"]: b for b in info["backups"]}
    assert [by_label[label]["type"] for label in labels] == ["full", "incr", "incr", "diff", "incr"]
    assert by_label[labels[1]]["parent"] == labels[0]
    assert by_label[labels[3]]["parent"] == labels[0]  # a diff is based on the last full
    assert by_label[labels[4]]["parent"] == labels[3]
    for label in labels[1:]:
        assert by_label[label]["stored"] < by_label[labels[0]]["stored"], by_label[label]

    assert dk.run("verify").exit_code == 0
    for label, _, expected in taken:
        _restore_and_compare(dk, pg, workdir, label, expected, tablespace=True)


def test_incr_without_parent_falls_back_to_full(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    result = dk.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["type"] == "full"
    assert "no earlier backup to base a incr backup on" in result.stderr


def test_incr_after_data_checksums_were_turned_on_falls_back_to_full(
    pg: PgCluster, workdir: Path
) -> None:
    """pg_checksums --enable rewrites every page offline: no WAL, no new page LSN."""
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    pg.stop()
    pg.run_bin("pg_checksums", "--disable", "-D", str(pg.pgdata))
    pg.start()
    init = dk.run("init", "--json")  # the repository exists; init says what it lacks
    assert init.exit_code == DataChecksumsOff.exit_code == 112, init.output
    assert "warning: data checksums are off" in init.stderr and "pg_checksums" in init.stderr
    [warning] = json.loads(init.stdout)["warnings"]
    assert (warning["warning"], warning["code"]) == ("DataChecksumsOff", 112)
    dk.ok("backup")
    pg.stop()
    pg.run_bin("pg_checksums", "--enable", "-D", str(pg.pgdata))
    pg.start()
    expected = database_checksums(pg)
    result = dk.run("backup", "--type", "incr", "--json")
    assert result.exit_code == 0, result.output
    backup = json.loads(result.stdout)
    assert backup["type"] == "full", backup
    assert "data checksums were turned on since the parent" in backup["notice"]
    _restore_and_compare(dk, pg, workdir, backup["label"], expected)


def test_chain_with_missing_member_is_refused(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = json.loads(dk.ok("backup", "--json").stdout)["label"]
    pg.run_bin("pgbench", "-n", "-t", "200")
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)["label"]
    manifest = dk.repo_path / "backup" / full / "manifest"
    manifest.unlink()
    target = workdir / "restored"
    result = dk.run("restore", "--pgdata", str(target), "--backup", incr)
    assert result.exit_code == 7, result.output
    assert f"depends on backup '{full}', which is missing" in result.stderr
    assert not target.exists()

    # a new incr does not build on the broken chain: it falls back to full, saying why
    after = dk.run("backup", "--type", "incr", "--json")
    assert after.exit_code == 0, after.output
    assert json.loads(after.stdout)["type"] == "full"
    assert f"backup '{full}', which backup '{incr}' depends on, is missing" in after.stderr


def test_diff_after_failed_verification_of_full_falls_back(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = json.loads(dk.ok("backup", "--json").stdout)["label"]
    victim = sorted((dk.repo_path / "backup" / full / "data").iterdir())[0]
    victim.chmod(0o600)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert dk.run("verify").exit_code == 15
    result = dk.run("backup", "--type", "diff", "--json")
    assert json.loads(result.stdout)["type"] == "full"
    assert "failed its last verification" in result.stderr


def _stored_data_bytes(dk: Drkit, label: str) -> tuple[int, int]:
    """(bytes of frames this backup stored for PGDATA files, files it referenced unchanged)."""
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupLabel
    from drkit.repo.open import open_repository

    repo = open_repository(load_settings(dk.config))
    manifest, _ = repo.load_manifest(BackupLabel(label))
    own = [f for f in manifest.files if f.backup is None and not f.path.startswith("pg_wal/")]
    return sum(f.length for f in own), sum(1 for f in manifest.files if f.backup is not None)


def test_incr_after_small_change_stores_only_changed_pages(pg: PgCluster, workdir: Path) -> None:
    pg.run_bin("pgbench", "-i", "-s", "5", "-q")
    pg.psql("VACUUM ANALYZE")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    full = json.loads(dk.ok("backup", "--json").stdout)["label"]
    pg.psql("UPDATE pgbench_accounts SET abalance = 7 WHERE aid BETWEEN 1 AND 500")
    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)["label"]
    full_bytes, _ = _stored_data_bytes(dk, full)
    incr_bytes, referenced = _stored_data_bytes(dk, incr)
    assert incr_bytes < full_bytes / 20, (incr_bytes, full_bytes)
    assert referenced > 100  # catalog files untouched since before the full were not even read
    _restore_and_compare(dk, pg, workdir, incr, expected)


@pytest.mark.parametrize("kill_at", ["first object", "third object", "key record"])
def test_killed_incremental_is_never_listed_and_next_one_succeeds(
    pg: PgCluster, workdir: Path, kill_at: str
) -> None:
    pg.run_bin("pgbench", "-i", "-s", "6", "-q")
    dk = Drkit(pg, workdir, backup={"process_max": 1, "bundle_limit": 256 * 1024})
    dk.ok("init")
    full = json.loads(dk.ok("backup", "--json").stdout)["label"]
    pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 3 = 0")

    proc = dk.spawn("backup", "--type", "incr")
    pattern, count = {
        "first object": ("*_*/data/*", 1),
        "third object": ("*_*/data/*", 3),
        "key record": ("*_*/key/*", 1),
    }[kill_at]
    deadline = time.monotonic() + 120
    while len(list((dk.repo_path / "backup").glob(pattern))) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    listed = [b["label"] for b in dk.info()["backups"]]
    # Killed before its manifest: not listed. (The manifest follows the key record within a
    # moment, so that kill point may also find the backup complete: then it is whole.)
    assert listed == [full] or (kill_at == "key record" and len(listed) == 2)
    if len(listed) == 2:
        assert dk.run("verify").exit_code == 0

    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr" and incr["parent"] == listed[-1]
    assert dk.info()["incomplete"] == []
    assert dk.run("verify").exit_code == 0
    _restore_and_compare(dk, pg, workdir, incr["label"], expected)


def test_incr_checks_the_pages_it_stores(pg: PgCluster, workdir: Path) -> None:
    """A page damaged after it changed is reported by the incr that stores it; the damaged
    file's other pages are the parent's, which the full checked."""
    pg.psql("CREATE TABLE victim AS SELECT g, md5(g::text) AS t FROM generate_series(1, 20000) g")
    pg.psql("CHECKPOINT")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    time.sleep(2.1)  # past the mtime safety margin, so only the change makes the file differ
    # change a row on page 3 (it gets a new LSN), then damage that page's tuples on disk
    pg.psql("UPDATE victim SET t = 'changed' WHERE ctid = '(3,1)'")
    pg.psql("CHECKPOINT")
    relpath = pg.psql("SELECT pg_relation_filepath('victim')")
    pg.stop()
    with (pg.pgdata / relpath).open("r+b") as f:
        f.seek(8192 * 3 + 6000)  # inside page 3's tuples, leaving the header intact
        f.write(b"\xde\xad\xbe\xef")
    pg.start()
    result = dk.run("backup", "--type", "incr")
    assert result.exit_code == 101, result.output  # PageChecksumFailure
    assert f"page checksum failure in '{relpath}' block 3" in result.stderr
    assert dk.info()["backups"][-1]["bad_pages"] == 1


def test_page_writer_writes_only_selected_pages_from_pieces_of_any_size(workdir: Path) -> None:
    import numpy as np

    from drkit.progress import NoProgress
    from drkit.repo.chain import Layer
    from drkit.repo.manifest import FileEntry
    from drkit.restore.assembly import PageWriter

    size = 9 * PAGE_SIZE + 100  # a trailing partial page
    spans = [(1, 4), (6, 10)]  # the frame holds blocks 1-3 and 6-9 (9: the partial one)
    frame = b"".join(bytes([block]) * PAGE_SIZE for block in (1, 2, 3, 6, 7, 8)) + b"\x09" * 100
    mask = np.zeros(10, dtype=bool)
    mask[[1, 3, 6, 7, 9]] = True  # block 2 and 8 come from a newer layer
    entry = FileEntry(path="f", size=size, mode=0o600, mtime=0, sha256="", object="", offset=0,
                      length=0, pages=spans)  # fmt: skip
    path = workdir / "f"
    path.write_bytes(b"\xff" * size)
    fd = os.open(path, os.O_WRONLY)
    try:
        writer = PageWriter(fd, Layer("b", entry, mask), spans, NoProgress())
        for cut in range(0, len(frame), 5000):  # pieces that split pages anywhere
            writer.feed(frame[cut : cut + 5000])
    finally:
        os.close(fd)
    data = path.read_bytes()
    pages = [data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(10)]
    for block in range(10):
        expected = block if mask[block] else 0xFF
        assert set(pages[block]) == {expected}, block
    assert len(data) == size


def test_assembled_file_is_checked_as_its_bytes_become_final(workdir: Path) -> None:
    """A file assembled from several writes (layers, or sections of the file) is read back and
    hashed up to the lowest byte any write still to come may touch, so a big file needs no
    read-back after its last write but its tail; the digest is compared when the last write is
    in."""
    import hashlib

    from drkit.errors import IntegrityError
    from drkit.repo.chain import FilePlan
    from drkit.repo.manifest import FileEntry
    from drkit.restore.assembly import Assembly
    from drkit.restore.paths import ClusterUser, TargetTree

    content = b"".join(bytes([block]) * PAGE_SIZE for block in range(8))
    sha = hashlib.sha256(content).hexdigest()
    entry = FileEntry(path="f", size=len(content), mode=0o600, mtime=0, object="", offset=0,
                      length=0, sha256=sha, pages=[(2, 3), (6, 7)], frame_sha256="")  # fmt: skip
    # three writes still to come, by the lowest byte each may touch
    writes = {"low": 0, "middle": 2 * PAGE_SIZE, "high": 4 * PAGE_SIZE}

    tree = TargetTree(workdir / "target", {}, ClusterUser("root", 0, 0))
    tree.make([])
    path = workdir / "target" / "f"
    path.write_bytes(content)
    done = Assembly(FilePlan(entry), writes)
    done.written("low", tree)  # blocks 0-1 are final
    assert (done._final, done.checked) == (2 * PAGE_SIZE, False)
    done.written("middle", tree)  # up to the lowest block of the last write
    assert (done._final, done.checked) == (4 * PAGE_SIZE, False)
    done.written("high", tree)
    assert (done._final, done.checked) == (8 * PAGE_SIZE, True)

    damaged = Assembly(FilePlan(entry), writes)
    damaged.written("middle", tree)
    with path.open("r+b") as f:  # a page the last write brings is wrong
        f.seek(5 * PAGE_SIZE)
        f.write(b"X")
    damaged.written("high", tree)
    assert damaged._final == 0  # block 0 is not final yet: nothing read back
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        damaged.written("low", tree)
    tree.close()


def test_large_delta_is_chunked_and_restores(pg: PgCluster, workdir: Path) -> None:
    """A delta of more than chunk_size is stored in chunks (compressed, and restored, in
    parallel) and restores to exactly the source's content; verify reads it back."""
    pg.run_bin("pgbench", "-i", "-s", "3", "-q")
    pg.psql("VACUUM ANALYZE")
    dk = Drkit(pg, workdir, backup={"chunk_size": 1024 * 1024})
    dk.ok("init")
    dk.ok("backup")
    time.sleep(2.1)  # past the mtime safety margin
    pg.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 3 = 0")
    pg.psql("CHECKPOINT")
    expected = database_checksums(pg)
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)["label"]

    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupLabel
    from drkit.repo.open import open_repository

    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(incr))
    relpath = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    [entry] = [f for f in manifest.files if f.path == relpath]
    assert entry.pages is not None and entry.chunks is not None and len(entry.chunks) > 2
    dk.ok("verify", "--backup", incr)
    _restore_and_compare(dk, pg, workdir, incr, expected)
