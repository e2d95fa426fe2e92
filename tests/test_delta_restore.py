"""Delta restore: an existing data directory brought to a backup's exact state, writing only the
files that differ, removing what the backup does not have, never following a planted link."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving
from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster, attach_cluster, database_checksums

from drkit.config.settings import load_settings
from drkit.errors import ServerControlError
from drkit.restore.operation import restore_backup
from drkit.restore.request import RestoreRequest

CHUNK = 4 * 1024 * 1024  # the rig's backup chunk_size: files above it are stored in chunks

SCHEMA = """
CREATE TABLE big (id int PRIMARY KEY, pad text);
INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 150000) g;
CREATE TABLE changed AS SELECT g FROM generate_series(1, 1000) g;
CREATE TABLE truncated AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000) g;
CREATE TABLE missing AS SELECT g FROM generate_series(1, 2000) g;
CREATE TABLE linked AS SELECT g FROM generate_series(1, 3000) g;
CHECKPOINT;
"""


def relation_file(cluster: PgCluster, table: str) -> str:
    return cluster.psql(f"SELECT pg_relation_filepath('{table}')")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The number of a process that has exited (a crashed server's postmaster.pid names one)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_changed_missing_extra_and_identical_files_restore_to_the_exact_backup(
    pg: PgCluster, workdir: Path
) -> None:
    pg.psql(SCHEMA)
    files = {t: relation_file(pg, t) for t in ("big", "changed", "truncated", "missing", "linked")}
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    source = database_checksums(pg)
    pg.psql("UPDATE big SET pad = 'moved on' WHERE id < 100; DROP TABLE changed")

    # A stale copy: the backup restored, then changed, emptied, extended and booby-trapped
    stale = workdir / "stale"
    dk.ok("restore", "--pgdata", str(stale))
    assert os.path.getsize(stale / files["big"]) > 3 * CHUNK
    with open(stale / files["big"], "r+b") as f:  # one byte in the third chunk, same size
        f.seek(2 * CHUNK + 100)
        byte = f.read(1)
        f.seek(2 * CHUNK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    changed = stale / files["changed"]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x01")  # same size, another checksum
    os.truncate(stale / files["truncated"], 8192)
    (stale / files["missing"]).unlink()
    (stale / "extra.conf").write_text("shared_buffers = 1TB\n")
    (stale / files["big"]).with_name("leftover").mkdir()
    (stale / files["big"]).with_name("leftover").joinpath("1").write_text("x")
    (stale / "postmaster.pid").write_text(f"{dead_pid()}\n{stale}\n")
    # Links planted where the backup has a file, a directory, and nothing
    outside = workdir / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("not drkit's to write\n")
    (stale / files["linked"]).unlink()
    (stale / files["linked"]).symlink_to(victim)
    (stale / files["big"]).with_name("99999").symlink_to(victim)
    xact_files = sorted(p.name for p in (stale / "pg_xact").iterdir())
    (outside / "xact").mkdir()
    for name in xact_files:
        (outside / "xact" / name).write_bytes(b"\0" * 8192)
    for name in xact_files:
        (stale / "pg_xact" / name).unlink()
    (stale / "pg_xact").rmdir()
    (stale / "pg_xact").symlink_to(outside / "xact")
    untouched = {p: digest(p) for p in [victim, *(outside / "xact").iterdir()]}
    # A file kept with a later mtime gets the backup's back; one kept as it was is left alone
    # (not even its inode changed)
    recorded = (stale / "global/pg_filenode.map").stat().st_mtime_ns
    os.utime(stale / "global/pg_filenode.map")
    kept = (stale / "PG_VERSION").stat()

    result = dk.ok("restore", "--delta", "--pgdata", str(stale), "--json")
    data = json.loads(result.stdout)
    delta = data["delta"]
    # changed, truncated, missing, linked, pg_xact's files, postgresql.auto.conf (the settings
    # a restore appends) and global/pg_control (always written last) are written whole; only
    # the third chunk of big
    rewritten = 6 + len(xact_files)
    assert delta == {
        "rewritten": rewritten,
        "patched": 1,
        "unchanged": data["files"] - rewritten - 1,
        # extra.conf, leftover/, the link 99999, postmaster.pid, the links at linked and pg_xact
        "removed": 6,
        "written": delta["written"],
        "trusted": 0,
        "origin": None,
    }
    assert CHUNK < delta["written"] < 2 * CHUNK
    assert (stale / "global/pg_filenode.map").stat().st_mtime_ns == recorded
    assert (stale / "PG_VERSION").stat().st_ctime_ns == kept.st_ctime_ns
    assert list(data["phases"]) == ["plan", "scan", "compare", "write", "finish", "sync"]

    # Nothing was written through a link; the links are gone, plain files and directories
    # stand in their place
    assert {p: digest(p) for p in untouched} == untouched
    assert not (stale / "pg_xact").is_symlink() and (stale / "pg_xact").is_dir()
    assert not (stale / files["linked"]).is_symlink()
    assert not (stale / "extra.conf").exists() and not (stale / "postmaster.pid").exists()

    restored = start_restored(stale, pg.version, workdir)
    assert database_checksums(restored) == source
    assert restored.psql("SHOW archive_mode") == "off"


def test_a_chain_delta_restores_over_a_copy_of_its_full(pg: PgCluster, workdir: Path) -> None:
    """A copy restored from the full (with a tablespace), started and stopped, brought to the
    incremental on top of it through the library, as a drill reusing its sandbox does."""
    pg.psql(SCHEMA)
    pg.psql(f"CREATE TABLESPACE fast LOCATION '{pg.make_tablespace_dir('fast')}'")
    pg.psql("CREATE TABLE hot TABLESPACE fast AS SELECT g FROM generate_series(1, 30000) g")
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    stale, fast = workdir / "stale", workdir / "fast-stale"
    dk.ok("restore", "--pgdata", str(stale), "--tablespace-map", f"fast={fast}")
    copy = start_restored(stale, pg.version, workdir)
    copy.psql("CREATE TABLE only_in_the_copy TABLESPACE fast AS SELECT 1")
    copy.psql("DELETE FROM hot WHERE g < 100")
    copy.stop()

    pg.psql("UPDATE big SET pad = 'updated' WHERE id % 1000 = 0; DROP TABLE missing")
    pg.psql("CREATE TABLE added AS SELECT g FROM generate_series(1, 5000) g")
    dk.ok("backup", "--type", "incr")
    source = database_checksums(pg)

    request = RestoreRequest(stale, tablespace_map={"fast": fast}, delta=True)
    result = restore_backup(load_settings(dk.config), request)
    assert result.delta is not None and result.exit_code == 0
    assert result.delta.rewritten > 0 and result.delta.removed > 0
    assert result.delta.unchanged > result.files // 2
    assert result.label.endswith("I")
    links = list((stale / "pg_tblspc").iterdir())
    assert len(links) == 1 and links[0].readlink() == fast

    restored = start_restored(stale, pg.version, workdir)
    assert database_checksums(restored) == source
    assert restored.psql("SELECT count(*) FROM hot") == "30000"


def test_trusting_timestamps_writes_what_changed_without_reading_what_did_not(
    pg_factory: Any, workdir: Path
) -> None:
    """A copy restored from one backup, brought to the next with --trust-timestamps: files
    whose size and mtime are the new backup's are kept unread; a file the copy holds as the
    first backup recorded it gets only the chunks that differ between the two manifests."""
    pg: PgCluster = pg_factory(18)
    pg.psql(SCHEMA)
    pg.psql("VACUUM ANALYZE big")  # hint bits set: the update below changes only its own pages
    pg.psql("CHECKPOINT")
    # Every file's mtime safely before the first backup (files written less than 2 s before a
    # backup started are compared by checksum all the same)
    old = time.time() - 60
    for path in pg.pgdata.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # a temporary file the server removed
                os.utime(path, (old, old))
    dk = Drkit(pg, workdir)
    dk.ok("init")
    first = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
    stale = workdir / "stale"
    dk.ok("restore", "--pgdata", str(stale))
    pg.psql("UPDATE big SET pad = 'moved on' WHERE id < 100; DROP TABLE changed; CHECKPOINT")
    dk.ok("backup", "--type", "full")
    source = database_checksums(pg)
    big = stale / relation_file(pg, "big")
    size = big.stat().st_size

    usage = dk.run("restore", "--trust-timestamps", "--pgdata", str(stale))
    assert usage.exit_code == 2 and "--trust-timestamps goes with --delta" in usage.output
    result = dk.ok("restore", "--delta", "--trust-timestamps", "--pgdata", str(stale), "--json")
    data = json.loads(result.stdout)
    delta = data["delta"]
    assert delta["origin"] == first
    # Most files kept unread; big patched from the manifests' chunk checksums, not read (what
    # was written beyond the backup's WAL segments, all new, is less than big alone)
    assert delta["trusted"] > data["files"] // 2
    wal = sum(p.stat().st_size for p in (stale / "pg_wal").iterdir() if p.is_file())
    assert delta["patched"] == 1 and delta["written"] - wal < size
    kept = delta["trusted"] + delta["unchanged"]
    assert kept + delta["rewritten"] + delta["patched"] == data["files"]

    restored = start_restored(stale, pg.version, workdir)
    assert database_checksums(restored) == source


def test_a_running_clusters_directory_is_refused_and_left_alone(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    kept = ["PG_VERSION", "global/pg_control", "postgresql.auto.conf"]
    before = {name: digest(pg.pgdata / name) for name in kept}
    relations = sorted(p for p in (pg.pgdata / "base").rglob("*") if p.is_file())

    refused = dk.run("restore", "--delta", "--pgdata", str(pg.pgdata))
    assert refused.exit_code == 25, refused.output
    assert "a PostgreSQL server is running in it" in refused.stderr
    assert "HINT: stop it first" in refused.stderr
    assert {name: digest(pg.pgdata / name) for name in kept} == before
    assert all(p.is_file() for p in relations)
    assert pg.psql("SELECT 1") == "1"

    # Without --delta a directory with files is refused as ever; with it, one that is no data
    # directory is too, and nothing in it is removed
    notes = workdir / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    plain = dk.run("restore", "--pgdata", str(notes))
    assert plain.exit_code == 14 and "because it contains files" in plain.stderr
    delta = dk.run("restore", "--delta", "--pgdata", str(notes))
    assert delta.exit_code == 14 and "not a PostgreSQL data directory" in delta.stderr
    assert (notes / "todo.txt").read_text() == "keep me\n"


def test_a_delta_restore_cut_short_leaves_a_directory_that_does_not_start(
    pg: PgCluster, workdir: Path
) -> None:
    """The backup's data is damaged: the delta restore fails once it has begun changing the
    stale copy, and leaves it without global/pg_control, so nobody starts a mix of both."""
    pg.psql(SCHEMA)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    label = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
    stale = workdir / "stale"
    dk.ok("restore", "--pgdata", str(stale))
    (stale / "standby.signal").touch()
    (stale / relation_file(pg, "changed")).write_bytes(b"\0" * 8192)
    backup = dk.repo_path / "backup" / label
    for stored in backup.rglob("*"):
        if stored.is_file() and stored.relative_to(backup).parts[0] == "data":
            stored.chmod(0o600)
            data = bytearray(stored.read_bytes())
            for offset in range(100, len(data), 1024):  # every frame, however small
                data[offset] ^= 0x01
            stored.write_bytes(bytes(data))

    failed = dk.run("restore", "--delta", "--pgdata", str(stale))
    assert failed.exit_code == 13, failed.output
    assert not (stale / "global" / "pg_control").exists()
    assert not (stale / "standby.signal").exists()
    assert (stale / "PG_VERSION").is_file() and (stale / relation_file(pg, "big")).is_file()
    copy = attach_cluster(stale, pg.version, workdir)
    with pytest.raises(ServerControlError):
        copy.start()


def test_a_lagging_standby_is_rebuilt_in_place_and_follows_its_primary(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql(SCHEMA)
    pg.psql("CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1)")
    dk.ok("backup", "--type", "full")
    conninfo = f"host={pg.socket_dir} port={pg.port} user=postgres application_name=rebuilt"
    target = workdir / "standby"
    standby_args = ["--type", "standby", "--primary-conninfo", conninfo]
    dk.ok("restore", "--pgdata", str(target), *standby_args)
    lagging = attach_cluster(target, pg.version, workdir)
    lagging.start(timeout=120)
    lagging.stop()  # down while the primary moves on
    pg.psql("UPDATE big SET pad = 'later' WHERE id < 5000; INSERT INTO ledger VALUES (2)")
    dk.ok("backup", "--type", "incr")

    rebuilt = dk.ok("restore", "--delta", "--pgdata", str(target), *standby_args, "--json")
    delta = json.loads(rebuilt.stdout)["delta"]
    assert delta["unchanged"] > delta["rewritten"] + delta["patched"] > 0
    assert (target / "standby.signal").is_file()
    standby = attach_cluster(target, pg.version, workdir)
    standby.start(timeout=120)
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    pg.psql("INSERT INTO ledger VALUES (3)")
    deadline = time.monotonic() + 60
    while standby.psql("SELECT count(*) FROM ledger") != "3":
        assert time.monotonic() < deadline, "the rebuilt standby never replayed the new rows"
        time.sleep(0.1)
