"""Remote diff/incr on PostgreSQL 18: the server's incremental base backup (UPLOAD_MANIFEST +
INCREMENTAL files) stored as drkit's own page deltas. Chains restore, start and hold every table
as the source did; a chain mixing the local engine and remote members restores; the data files
drkit restores are byte for byte those pg_basebackup --incremental + pg_combinebackup produce;
without WAL summaries, the data directory is read over SQL; the fall-backs to full say why."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster, PgFactory, attach_cluster, database_checksums, make_rig_dir
from test_remote import (
    BACKUP_ROLE,
    create_backup_role,
    listen_on_tcp,
    remote,
    restore_and_compare,
)

from drkit.backup.file_writers import CopyJob, PgIncremental
from drkit.backup.plan import Delta, Source
from drkit.config.settings import BackupSettings, load_settings
from drkit.pg.incremental import INCREMENTAL_MAGIC, backup_manifest, read_incremental_header
from drkit.pg.remote_files import FILE_FUNCTIONS
from drkit.progress import NoProgress
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry
from drkit.repo.open import open_repository

TABLES = """
CREATE TABLE accounts (id int PRIMARY KEY, balance int, filler text);
INSERT INTO accounts SELECT g, 0, repeat('a', 200) FROM generate_series(1, 40000) g;
CREATE TABLE shrinking (id int, filler text);
INSERT INTO shrinking SELECT g, repeat('s', 200) FROM generate_series(1, 20000) g;
CREATE TABLE doomed AS SELECT g FROM generate_series(1, 1000) g;
CREATE TABLE emptied AS SELECT g FROM generate_series(1, 1000) g;
VACUUM;
"""
# An update of 1% of the rows; the tail of 'shrinking' deleted and cut off its file by VACUUM
# (its pages left were all-visible before: the file is sent incrementally, shorter);
# a dropped table, a new one, a truncated one (a new relfilenode).
CHANGES = """
UPDATE accounts SET balance = balance + 1 WHERE id % 100 = 0;
DELETE FROM shrinking WHERE id > 5000;
VACUUM shrinking;
DROP TABLE doomed;
CREATE TABLE fresh AS SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
TRUNCATE emptied;
"""


def _backup(dk: Drkit, kind: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(dk.ok("backup", "--type", kind, "--json").stdout)
    return result


def _entries(dk: Drkit, label: str) -> dict[str, FileEntry]:
    manifest, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return {f.path: f for f in manifest.files}


def _remote_dk(pg: PgCluster, workdir: Path) -> Drkit:
    listen_on_tcp(pg)
    # a low large-file threshold: INCREMENTAL files both held in memory and streamed
    dk = Drkit(pg, workdir, backup={"bundle_limit": 64 * 1024})
    remote(dk)
    dk.ok("init")
    return dk


def test_remote_incr_chain_restores_every_change(pg_factory: PgFactory, workdir: Path) -> None:
    pg = pg_factory(18)
    pg.psql(TABLES)
    dk = _remote_dk(pg, workdir)
    full = _backup(dk, "full")
    shrinking = pg.psql("SELECT pg_relation_filepath('shrinking')")
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    pg.psql(CHANGES)
    incr = _backup(dk, "incr")
    assert incr["type"] == "incr" and incr["parent"] == full["label"], incr
    assert incr["notice"] is None and incr["stats"]["changes"] == "summaries"
    assert incr["stats"]["stored"] < full["stats"]["stored"] / 2

    entries, before = _entries(dk, incr["label"]), _entries(dk, full["label"])
    # only the blocks the update touched crossed the network and were stored
    updated = entries[accounts]
    assert updated.pages is not None and updated.base == full["label"]
    stored_blocks = sum(end - start for start, end in updated.pages)
    assert 0 < stored_blocks < updated.size // 8192 // 2
    # the truncated file: a delta of the full, shorter (its truncation length honoured)
    cut = entries[shrinking]
    assert cut.pages is not None and cut.base == full["label"] and cut.sha256 is None
    assert 0 < cut.size < before[shrinking].size
    # files the server sent as unchanged incremental files: references to the full
    assert sum(e.backup == full["label"] for e in entries.values()) > 100
    assert not any("INCREMENTAL." in path for path in entries)

    pg.psql("UPDATE accounts SET balance = balance + 2 WHERE id % 1000 = 1")
    pg.psql("INSERT INTO shrinking SELECT g, 'back' FROM generate_series(1, 300) g")
    second = _backup(dk, "incr")
    assert second["type"] == "incr" and second["parent"] == incr["label"]
    source = database_checksums(pg)
    dk.ok("verify")
    restored = restore_and_compare(dk, workdir, source)
    assert restored.psql("SELECT count(*) FROM shrinking") == "5300"


def test_a_chain_mixing_local_and_remote_members_restores(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(18)
    pg.psql(TABLES)
    dk = _remote_dk(pg, workdir)
    dk.write_config()  # local mode, on the database host
    full = _backup(dk, "full")
    pg.psql(CHANGES)
    remote(dk)
    diff = _backup(dk, "diff")  # the server's incremental on top of the local engine's full
    assert diff["type"] == "diff" and diff["parent"] == full["label"], diff
    pg.psql("UPDATE accounts SET balance = 7 WHERE id % 50 = 0")
    dk.write_config()
    last = _backup(dk, "incr")  # the local engine on top of the remote member
    assert last["type"] == "incr" and last["parent"] == diff["label"]
    restore_and_compare(dk, workdir, database_checksums(pg))


def test_restored_files_equal_pg_combinebackup(pg_factory: PgFactory, workdir: Path) -> None:
    """The same full and incremental taken by drkit and by pg_basebackup --incremental, with no
    change in between (autovacuum off): every user relation file drkit restores is byte for
    byte the file pg_combinebackup reconstructs, and both clusters hold the same tables."""
    pg = pg_factory(18, {"autovacuum": False})
    pg.psql(TABLES)
    dk = _remote_dk(pg, workdir)
    native = make_rig_dir(workdir, "native-")
    _backup(dk, "full")
    pg.run_bin("pg_basebackup", "-D", str(native / "full"), "-c", "fast")
    pg.psql(CHANGES)
    incr = _backup(dk, "incr")
    assert incr["type"] == "incr"
    manifest = str(native / "full" / "backup_manifest")
    pg.run_bin("pg_basebackup", "-D", str(native / "incr"), "-c", "fast", "-i", manifest)
    combined = native / "combined"
    pg.run_bin("pg_combinebackup", str(native / "full"), str(native / "incr"), "-o", str(combined))
    ours = workdir / "restored"
    dk.ok("restore", "--pgdata", str(ours))

    database = pg.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'")
    relations = [p for p in (combined / "base" / database).iterdir() if _user_relation(p.name)]
    assert len(relations) >= 8  # the tables, their vm/fsm forks, the index
    for path in relations:
        assert (ours / "base" / database / path.name).read_bytes() == path.read_bytes(), path.name
    assert {p.name for p in (ours / "base" / database).iterdir() if _user_relation(p.name)} == {
        p.name for p in relations
    }
    source = database_checksums(pg)
    assert database_checksums(start_restored(ours, 18, workdir)) == source
    theirs = attach_cluster(combined, 18, workdir)
    theirs.start()
    assert database_checksums(theirs) == source


def test_remote_incr_without_summaries_reads_over_sql_or_falls_back_saying_why(
    pg_factory: PgFactory, workdir: Path
) -> None:
    """summarize_wal off: without the file functions' grants, a full naming them and both ways
    out. With them (a superuser), turned on after the WAL of a full left pg_wal: the summaries
    do not reach back to the full's start, the server refuses the incremental, the incr reads
    over SQL instead. Off again: the incr reads the blocks the WAL names over SQL; the chain
    restores."""
    pg = pg_factory(18, {"summarize_wal": False, "wal_keep_size": 0})
    pg.psql(TABLES)
    create_backup_role(pg)
    dk = _remote_dk(pg, workdir)
    remote(dk, user=BACKUP_ROLE)
    init = dk.ok("init").stdout
    assert "diff and incr backups will be full backups while summarize_wal is off" in init
    _backup(dk, "full")
    off = _backup(dk, "incr")
    assert off["type"] == "full" and "summarize_wal is off on the server" in off["notice"]
    assert "set summarize_wal = on, or grant those functions" in off["notice"]
    for function in FILE_FUNCTIONS:
        assert function in off["notice"]
    remote(dk)
    for _ in range(2):  # the oldest segment left, where summarizing starts, is after its start
        pg.psql("CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1)")
        pg.psql("SELECT pg_switch_wal(); CHECKPOINT")
    pg.set_conf({"summarize_wal": True})
    pg.reload()
    pg.psql("UPDATE accounts SET balance = 5 WHERE id = 7")
    refused = _backup(dk, "incr")
    assert refused["type"] == "incr" and refused["parent"] == off["label"], refused
    assert "the server refused an incremental backup" in refused["notice"]
    assert "WAL summaries are required" in refused["notice"]
    assert "reading the changed blocks over SQL instead" in refused["notice"]
    assert refused["stats"]["stored"] < off["stats"]["stored"] / 2

    pg.set_conf({"summarize_wal": False})
    pg.reload()
    accounts = pg.psql("SELECT pg_relation_filepath('accounts')")
    pg.psql(CHANGES.replace("id % 100 = 0", "id % 1000 = 0"))
    incr = _backup(dk, "incr")
    assert incr["type"] == "incr" and incr["parent"] == refused["label"], incr
    assert incr["notice"] is None and incr["stats"]["changes"] == "wal"
    assert incr["stats"]["stored"] < off["stats"]["stored"] / 2
    updated = _entries(dk, incr["label"])[accounts]  # only the blocks the WAL names
    assert updated.pages is not None and updated.base == refused["label"]
    assert 0 < sum(end - start for start, end in updated.pages) < updated.size // 8192 // 2
    dk.ok("verify")
    restore_and_compare(dk, workdir, database_checksums(pg))


def test_incremental_header_and_manifest_formats() -> None:
    header = (0xD3AE1F0D).to_bytes(4, "little") + (2).to_bytes(4, "little")
    header += (9).to_bytes(4, "little") + (3).to_bytes(4, "little") + (12).to_bytes(4, "little")
    data = header + bytes(8192 - len(header))
    stream = iter([data[:12], data[12:20], data[20:]])
    parsed = read_incremental_header(lambda n: next(stream), "base/5/INCREMENTAL.1")
    assert parsed.blocks.tolist() == [3, 12] and parsed.truncation == 9
    assert parsed.length == 13 and parsed.header_size == 8192

    text = backup_manifest(7, [("base/5/1", 8192)], 1, 0x2000028, 0x2000100)
    body, last = text.rsplit(b"\n", 2)[0] + b"\n", text.rsplit(b"\n", 2)[1]
    document = json.loads(text)
    assert document["Files"] == [{"Path": "base/5/1", "Size": 8192}]
    assert document["WAL-Ranges"][0]["Start-LSN"] == "0/2000028"
    assert document["Manifest-Checksum"] == hashlib.sha256(body).hexdigest()
    assert last.startswith(b'"Manifest-Checksum"')  # the one line the checksum leaves out


def test_an_incremental_file_is_stored_as_postgresql_reconstructs_it() -> None:
    """Blocks 1, 7, 9 sent, truncation length 4, a parent of 6 blocks: the file is 10 blocks;
    0, 2 and 3 stay the parent's; 4 to 6 and 8 (at or past the truncation length) are zeros,
    stored as such, so the chain holds every block."""
    sent = (1, 7, 9)
    header = struct.pack("<6I", INCREMENTAL_MAGIC, len(sent), 4, *sent)
    pages = b"".join(bytes([b]) * 8192 for b in sent)
    data = header + bytes(8192 - len(header)) + pages
    stream = io.BytesIO(data)
    delta = Delta(0, 6 * 8192, "20261207-190000F", incremental=True)
    src = Source("base/5/16384", len(data), 0o600, 0.0, lambda: stream, delta=delta)
    label = BackupLabel("20261207-190000F_20261207-190100I")
    job = CopyJob(label, bytes(32), BackupSettings(process_max=1), NoProgress(), None)
    writer = PgIncremental(job, src, stream, delta)
    frame = writer.open_frame(lambda _: None)
    writer.take(frame, np.arange(3), memoryview(stream.read()))
    writer.finish()
    entry = writer.entry(frame.close(), "data/0", 0)
    assert entry.size == 10 * 8192 and entry.sha256 is None and entry.base == delta.base
    assert entry.pages == [(1, 2), (4, 10)]
    zero = bytes(8192)
    laid = pages[:8192] + zero * 3 + pages[8192:16384] + zero + pages[16384:]
    assert entry.frame_sha256 == hashlib.sha256(laid).hexdigest()


def _user_relation(name: str) -> bool:
    """A relation file (any fork or segment) of a user table or index."""
    number = name.split("_")[0].split(".")[0]
    return number.isdigit() and int(number) >= 16384
