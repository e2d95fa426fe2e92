"""The PGDATA walk: PostgreSQL's documented exclusions, tablespaces, unlogged relations."""

from __future__ import annotations

import os
from pathlib import Path

from drkit.pg.pages import relation_segment
from drkit.pg.walk import walk_pgdata


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_walk_excludes_what_postgresql_documents(tmp_path: Path) -> None:
    pgdata = tmp_path / "data"
    for name in [
        "PG_VERSION", "postgresql.auto.conf", "global/pg_control", "global/1262",
        "base/5/1259", "base/5/1259_fsm", "base/5/16400", "base/5/16400.1",
        "base/5/16500", "base/5/16500_fsm", "base/5/16500_init", "base/5/16500.1",
        "base/5/pg_internal.init", "global/pg_internal.init",
        "base/pgsql_tmp/pgsql_tmp123.0", "base/5/pgsql_tmp99",
        "pg_wal/000000010000000000000001", "pg_wal/archive_status/x.ready",
        "pg_replslot/slot/state", "pg_stat_tmp/global.stat", "pg_subtrans/0000",
        "pg_notify/0000", "pg_serial/0000", "pg_snapshots/x", "pg_dynshmem/x",
        "postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map",
        "recovery.signal", "standby.signal", "pg_xact/0000", "pg_stat/pgstat.stat",
    ]:  # fmt: skip
        touch(pgdata / name)
    ts = tmp_path / "ts"
    touch(ts / "PG_15_202209061" / "5" / "16600")
    touch(ts / "PG_14_202107181" / "5" / "99999")  # another major version's directory
    (pgdata / "pg_tblspc").mkdir()
    os.symlink(ts, pgdata / "pg_tblspc" / "16599")

    listing = walk_pgdata(pgdata, "PG_15_202209061")
    files = {f.path for f in listing.files}
    assert files == {
        "PG_VERSION", "postgresql.auto.conf", "global/pg_control", "global/1262",
        "base/5/1259", "base/5/1259_fsm", "base/5/16400", "base/5/16400.1",
        "base/5/16500_init",  # an unlogged relation keeps only its init fork
        "pg_xact/0000", "pg_stat/pgstat.stat",
        "pg_tblspc/16599/PG_15_202209061/5/16600",
    }  # fmt: skip
    dirs = {d.path for d in listing.dirs}
    # Excluded contents keep their (empty) directory so the restored cluster has it.
    assert {"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_subtrans", "pg_notify"} <= dirs
    assert "pg_wal/archive_status" not in dirs
    assert listing.tablespace_dirs == {16599: ts.resolve()}
    assert listing.links == []


def test_relation_segment_recognises_relation_files() -> None:
    assert relation_segment("base/5/16400") == 0
    assert relation_segment("base/5/16400.3") == 3
    assert relation_segment("base/5/16400_vm") == 0
    assert relation_segment("global/1262") == 0
    assert relation_segment("pg_tblspc/16599/PG_15_202209061/5/16600.2") == 2
    assert relation_segment("base/5/PG_VERSION") is None
    assert relation_segment("global/pg_control") is None
    assert relation_segment("pg_xact/0000") is None
