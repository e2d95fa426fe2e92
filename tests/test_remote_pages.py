"""Remote mode and the local engine agree on pages: a damaged page is reported the same way by
both, and a local diff/incr on a remote parent skips the files that did not change although the
parent recorded their mtimes in whole seconds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster, database_checksums
from test_remote import listen_on_tcp, remote, restore_and_compare

from drkit.config.settings import load_settings
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import Manifest
from drkit.repo.open import open_repository


def manifest(dk: Drkit, label: str) -> Manifest:
    loaded, _ = open_repository(load_settings(dk.config)).load_manifest(BackupLabel(label))
    return loaded


def test_a_damaged_page_is_reported_as_the_local_engine_does(pg: PgCluster, workdir: Path) -> None:
    """The local engine's contract (test_backup_restore): the page is backed up as it was read,
    named in a warning (exit 101) and counted by info. The server ends its base backup with an
    error once it has sent everything; the backup is whole all the same."""
    pg.psql("CREATE TABLE victim AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    pg.psql("CHECKPOINT")
    relpath = pg.psql("SELECT pg_relation_filepath('victim')")
    pg.set_conf({"listen_addresses": "127.0.0.1"})
    pg.stop()
    with (pg.pgdata / relpath).open("r+b") as f:
        f.seek(8192 * 3 + 4000)  # inside page 3's tuples, leaving the header intact
        f.write(b"\xde\xad\xbe\xef")
    pg.start()
    dk = Drkit(pg, workdir)
    remote(dk)
    dk.ok("init")
    result = dk.run("backup", "--json")
    assert result.exit_code == 101, result.output  # PageChecksumFailure
    assert f"page checksum failure in '{relpath}' block 3" in result.stderr
    [backup] = dk.info()["backups"]
    assert backup["label"] == json.loads(result.stdout)["label"] and backup["bad_pages"] == 1
    [entry] = [f for f in manifest(dk, backup["label"]).files if f.path == relpath]
    assert entry.bad_pages == [3]
    dk.ok("verify")


def test_a_local_incr_on_a_remote_full_skips_unchanged_files(pg: PgCluster, workdir: Path) -> None:
    """A remote full records whole-second mtimes (tar headers): the local incr on top of it
    still references the files that did not change instead of reading them again, and the
    chain restores."""
    # autovacuum off: its hint bits would rewrite the table's pages, and its mtime
    pg.psql(
        "CREATE TABLE still WITH (autovacuum_enabled = off) AS"
        " SELECT g, md5(g::text) FROM generate_series(1, 20000) g"
    )
    pg.psql("CREATE TABLE busy AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    pg.psql("CHECKPOINT")
    still = pg.psql("SELECT pg_relation_filepath('still')")
    busy = pg.psql("SELECT pg_relation_filepath('busy')")
    # Written an hour ago, at a fraction of a second the parent's whole seconds cannot hold
    # (files written within seconds of a backup are never trusted by their mtime)
    past = time.time() - 3600.375
    for path in ("PG_VERSION", still):
        os.utime(pg.pgdata / path, (past, past))
    listen_on_tcp(pg)
    dk = Drkit(pg, workdir)
    remote(dk)
    dk.ok("init")
    full = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
    assert manifest(dk, full).files[0].mtime.is_integer()

    pg.psql("UPDATE busy SET md5 = 'changed' WHERE g % 50 = 0")
    pg.psql("CHECKPOINT")
    dk.write_config()  # local mode, on the database host
    incr = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert incr["type"] == "incr" and incr["parent"] == full
    files = {f.path: f for f in manifest(dk, incr["label"]).files}
    assert files["PG_VERSION"].backup == full and files[still].backup == full
    assert files[busy].backup is None and files[busy].pages  # changed: its pages stored
    restore_and_compare(dk, workdir, database_checksums(pg))
