"""Deltas stored as XOR differences from the parent's version of each page (backup.xor_deltas)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from test_incremental import _restore_and_compare

from drkit.backup.file_writers import xor_changed
from drkit.codec.frame import HEADER_SIZE, is_sparse
from drkit.pg.pages import PAGE_SIZE
from drkit.repo.manifest import FileEntry

# Changed files read whole (page-LSN scan): what XOR deltas are made of.
SCAN = {"wal_summaries": False, "wal_scan": False}


def test_xor_changed_takes_the_selected_pages_and_a_trailing_partial_page() -> None:
    chunk = memoryview(b"".join(bytes([i]) * PAGE_SIZE for i in (1, 2, 3)) + b"\x07" * 100)
    blocks = np.arange(10, 14)  # the chunk holds blocks 10-12 and a partial block 13
    changed = np.array([True, False, True, True])
    asked: list[list[int]] = []

    def older(wanted: np.ndarray) -> np.ndarray:
        asked.append(wanted.tolist())
        return np.full((len(wanted), PAGE_SIZE), 0x0F, dtype=np.uint8)

    out = xor_changed(chunk, blocks, changed, older)
    assert asked == [[10, 12, 13]]  # the parent's version of exactly the changed blocks
    assert out == (
        bytes([1 ^ 0x0F]) * PAGE_SIZE + bytes([3 ^ 0x0F]) * PAGE_SIZE + bytes([7 ^ 0x0F]) * 100
    )
    assert xor_changed(chunk, blocks, np.zeros(4, dtype=bool), older) == b""


def _entry(dk: Drkit, label: str, path: str) -> FileEntry:
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupLabel
    from drkit.repo.open import open_repository

    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return next(f for f in manifest.files if f.path == path)


def _sparse(dk: Drkit, entry: FileEntry) -> bool:
    """Whether the entry's frame holds sparse-page records (its header says so)."""
    with (dk.repo_path / entry.object).open("rb") as f:
        f.seek(entry.offset)
        return is_sparse(f.read(HEADER_SIZE))


def _backup(dk: Drkit, kind: str) -> str:
    label: str = json.loads(dk.ok("backup", "--type", kind, "--json").stdout)["label"]
    return label


def _change(pg: PgCluster, sql: str) -> None:
    time.sleep(2.1)  # past the mtime safety margin
    pg.psql(sql)
    pg.psql("CHECKPOINT")


def test_xor_deltas_are_small_and_every_chain_restores_exactly(
    pg: PgCluster, workdir: Path
) -> None:
    """Updates change a few bytes of each page they touch: an incr stores XOR differences from
    the parent's version, a fraction of what the same pages take stored plainly (a diff with
    xor_deltas off, of the same state); an incr on a plain diff and one on an XOR incr (XOR of
    XOR) restore exactly, and so do the others."""
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    pg.psql("VACUUM ANALYZE")
    # scan deltas on every version (WAL summaries would skip the whole-file read XOR needs)
    dk = Drkit(pg, workdir, backup={**SCAN, "chunk_size": 1024 * 1024})
    dk.ok("init")
    dk.ok("backup")
    relpath = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    expected: dict[str, dict[str, dict[str, str]]] = {}

    _change(pg, "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 5 = 0")
    incr = _backup(dk, "incr")
    dk.backup["xor_deltas"] = False
    dk.write_config()
    plain = _backup(dk, "diff")  # the same pages, of the same state, stored plainly
    expected[incr] = expected[plain] = database_checksums(pg)
    xor, raw = _entry(dk, incr, relpath), _entry(dk, plain, relpath)
    assert xor.xor and not raw.xor and xor.pages == raw.pages
    assert xor.length * 3 < raw.length, (xor.length, raw.length)
    assert _sparse(dk, xor) and not _sparse(dk, raw)  # XOR pages are stored as sparse pages

    dk.backup["xor_deltas"] = True
    dk.write_config()
    _change(pg, "UPDATE pgbench_accounts SET abalance = abalance - 2 WHERE aid % 3 = 0")
    on_plain = _backup(dk, "incr")
    expected[on_plain] = database_checksums(pg)
    _change(
        pg,
        "UPDATE pgbench_accounts SET abalance = abalance + 3 WHERE aid % 4 = 0;"
        "DELETE FROM pgbench_accounts WHERE aid > 150000; VACUUM pgbench_accounts",
    )
    on_xor = _backup(dk, "incr")
    expected[on_xor] = database_checksums(pg)
    assert _entry(dk, on_plain, relpath).xor and _entry(dk, on_xor, relpath).xor

    dk.ok("verify")
    for label, checksums in expected.items():
        _restore_and_compare(dk, pg, workdir, label, checksums)
    _restores_alike_in_small_pieces(dk, workdir, on_xor)


def test_xor_deltas_written_as_plain_pages_still_restore(pg: PgCluster, workdir: Path) -> None:
    """Frames of XOR deltas written before sparse pages hold the XORed pages themselves (frame
    flag clear): a chain with one restores exactly, with the default pieces and with tiny ones."""
    from drkit.backup import file_writers
    from drkit.backup.operation import BackupOperation
    from drkit.codec.frame_writer import FrameWriter
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupType

    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    dk = Drkit(pg, workdir, backup={**SCAN, "chunk_size": 1024 * 1024})
    dk.ok("init")
    dk.ok("backup")
    _change(pg, "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 3 = 1")

    def plain_pages(*args: Any, **kwargs: Any) -> FrameWriter:
        return FrameWriter(*args, **{**kwargs, "sparse_pages": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(file_writers, "FrameWriter", plain_pages)
        label = str(BackupOperation(load_settings(dk.config), BackupType.INCR).run().manifest.label)
    relpath = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    entry = _entry(dk, label, relpath)
    assert entry.xor and not _sparse(dk, entry)
    _restore_and_compare(dk, pg, workdir, label, database_checksums(pg))
    _restores_alike_in_small_pieces(dk, workdir, label)


def test_xor_delta_chunks_end_at_section_boundaries(pg: PgCluster, workdir: Path) -> None:
    """No chunk of an XOR delta holds pages of two restore sections (so a restore decodes each
    chunk for one section only), however the changed pages fall; the chain restores exactly."""
    from drkit.backup import file_writers
    from drkit.backup.operation import BackupOperation
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupType

    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    dk = Drkit(pg, workdir, backup={**SCAN, "chunk_size": 1024 * 1024})
    dk.ok("init")
    dk.ok("backup")
    _change(pg, "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 7 < 3")
    section = 400  # blocks; a chunk holds 128 pages
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(file_writers, "SECTION_PAGES", section)
        label = str(BackupOperation(load_settings(dk.config), BackupType.INCR).run().manifest.label)
    entry = _entry(dk, label, pg.psql("SELECT pg_relation_filepath('pgbench_accounts')"))
    assert entry.xor and entry.chunks and entry.pages
    blocks = np.concatenate([np.arange(start, end) for start, end in entry.pages])
    starts = [chunk[0] // PAGE_SIZE for chunk in entry.chunks] + [len(blocks)]
    sections = [set((blocks[a:b] // section).tolist()) for a, b in itertools.pairwise(starts)]
    assert all(len(each) == 1 for each in sections), sections
    assert len(sections) > len(set.union(*sections))  # some sections have several chunks
    _restore_and_compare(dk, pg, workdir, label, database_checksums(pg))


def _restores_alike_in_small_pieces(dk: Drkit, workdir: Path, label: str) -> None:
    """Restored in-process with sections, windows and writes a few pages long (sections end
    inside the deltas' chunks and windows inside runs of changed pages), every file is
    identical to a restore with the default sizes (as the caller's, compared with the
    source)."""
    from drkit import fsutil
    from drkit.config.settings import load_settings
    from drkit.restore import assembly, files
    from drkit.restore.operation import RestoreOperation, RestoreRequest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assembly, "SECTION_PAGES", 37)
        patch.setattr(files, "WINDOW_PAGES", 5)
        patch.setattr(fsutil, "WRITE_PIECE", 3 * PAGE_SIZE + 100)
        target = workdir / "small-pieces"
        RestoreOperation(load_settings(dk.config), RestoreRequest(target, label)).run()
    reference = workdir / "default-pieces"
    dk.ok("restore", "--pgdata", str(reference), "--backup", label)
    restored = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    assert restored == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    for path in restored:
        assert (target / path).read_bytes() == (reference / path).read_bytes(), path


def test_damaged_parent_fails_an_xor_incr_clearly_and_lists_nothing(
    pg: PgCluster, workdir: Path
) -> None:
    """An XOR delta needs its parent's pages: when they cannot be read back intact the incr
    fails with an error naming the parent (a delta on it could not be restored anyway), and
    nothing partial is listed as a backup; the next backup (a full) succeeds and removes what the
    failed one wrote."""
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    dk = Drkit(pg, workdir, backup=SCAN)
    dk.ok("init")
    full = _backup(dk, "full")
    relpath = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    entry = _entry(dk, full, relpath)
    victim = dk.repo_path / entry.object
    assert victim.is_file(), entry.object
    victim.chmod(0o600)
    with victim.open("r+b") as f:  # damage the middle of the table's frame
        f.seek(entry.offset + entry.length // 2)
        f.write(bytes(64))

    _change(pg, "UPDATE pgbench_accounts SET abalance = abalance + 1")
    result = dk.run("backup", "--type", "incr")
    assert result.exit_code != 0
    assert f"parent's version of '{relpath}'" in result.stderr and full in result.stderr
    assert [b["label"] for b in dk.info()["backups"]] == [full]
    # the next backup succeeds and removes what the failed one wrote
    _backup(dk, "full")
    info = dk.info()
    assert len(info["backups"]) == 2 and info["incomplete"] == []


def test_xor_and_wal_block_deltas_mix_in_one_chain(pg: PgCluster, workdir: Path) -> None:
    """An incr of the blocks the WAL names (the server's summaries on 17+, drkit reading the
    WAL on 15) stores plain pages — it has no whole-file checksum to prove an XOR — so chains
    mix the two kinds: WAL blocks, then XOR on top (its parent's pages rebuilt through a WAL
    delta), then WAL blocks on top of XOR; each restores exactly."""
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    pg.psql("VACUUM ANALYZE")
    dk = Drkit(pg, workdir, backup={"chunk_size": 1024 * 1024})
    dk.ok("init")
    dk.ok("backup")
    relpath = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')")
    expected: dict[str, dict[str, dict[str, str]]] = {}
    kinds = []
    for step, from_wal in enumerate([True, False, True]):
        dk.backup.update(wal_summaries=from_wal, wal_scan=from_wal)
        dk.backup["scan_fraction"] = 1  # every page changes, yet only the summaries' blocks read
        dk.write_config()
        _change(pg, f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 6 = {step}")
        label = _backup(dk, "incr")
        expected[label] = database_checksums(pg)
        kinds.append(_entry(dk, label, relpath).xor)
    assert kinds == [False, True, False]
    for label, checksums in expected.items():
        _restore_and_compare(dk, pg, workdir, label, checksums)
