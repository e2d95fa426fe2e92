"""Objects added to a write-once repository (what someone who can only add objects — Object Lock
forbids the rest — can do) do not make the backups or the WAL archive unreadable: every key
record is tried until one opens what it should, unauthentic manifests are passed over by
restore, by the choice of a parent and by prune, and reported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rig.archive import enable_archiving, grant_to_server_user, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, database_checksums
from rig.vault import backup_label, restore_and_compare
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.crypto.keyfile import KeyfileProvider
from drkit.errors import BackupSkipped
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage

BOGUS = "20991231-000000F"  # sorts after every genuine label: the "latest" backup


def _segment(pg: PgCluster) -> Path:
    """A segment just finished (something written, then switched), still in pg_wal."""
    return pg.pgdata / "pg_wal" / switch_wal(pg)


def test_added_objects_leave_backups_and_wal_readable(pg: PgCluster, workdir: Path) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    dk = Drkit(pg, workdir)
    dk.write_config(retention={"full": 1})
    dk.ok("init")
    first = backup_label(dk, "--type", "full")
    first_data = database_checksums(pg)
    pg.psql("INSERT INTO t SELECT g FROM generate_series(5001, 6000) g")
    second = backup_label(dk, "--type", "full")
    segment = _segment(pg)
    dk.ok("wal-push", str(segment))

    repo = dk.repo_path
    genuine_record = repo / "backup" / second / "key" / "0001.json"
    [period] = [p.name for p in (repo / "wal-keys").iterdir()]
    # 1. A newer key record for the first backup: a genuine record, of another backup's DEK.
    shutil.copy(genuine_record, repo / "backup" / first / "key" / "0002.json")
    # 2. The same for the WAL key period.
    shutil.copy(genuine_record, repo / "wal-keys" / period / "0002.json")
    # 3. A newest "backup" whose manifest nobody with the key sealed.
    (repo / "backup" / BOGUS / "key").mkdir(parents=True)
    shutil.copy(genuine_record, repo / "backup" / BOGUS / "key" / "0001.json")
    (repo / "backup" / BOGUS / "manifest").write_bytes(os.urandom(4096))

    # The first backup restores, with its own data.
    restore_and_compare(dk, first, workdir / "first", first_data)

    # The default restore passes over the bogus "latest" and says so.
    result = dk.run("restore", "--pgdata", str(workdir / "latest"))
    assert result.exit_code == BackupSkipped.exit_code, result.output
    assert f"restored backup {second} from 'local'" in result.stdout
    assert f"warning: backup '{BOGUS}' skipped" in result.stderr

    # The archived segment is fetched intact.
    fetched = workdir / "fetched"
    dk.ok("wal-fetch", segment.name, str(fetched))
    assert fetched.read_bytes() == segment.read_bytes()

    # An incremental backup is based on the newest genuine backup, not taken as a full.
    backup = json.loads(dk.ok("backup", "--type", "incr", "--json").stdout)
    assert backup["label"].startswith(f"{second}_") and backup["label"].endswith("I")
    assert f"backup '{BOGUS}' skipped as a parent" in backup["notice"]

    # Prune keeps the newest genuine full and its incr, deletes the first, and never counts
    # nor deletes the bogus one.
    result = dk.run("prune", "--json")
    assert result.exit_code == BackupSkipped.exit_code, result.output
    [report] = json.loads(result.stdout)["repos"]
    assert report["deleted"] == [first]
    assert [u["label"] for u in report["unreadable"]] == [BOGUS]
    assert f"backup '{BOGUS}' was left out of retention and kept" in result.stdout
    assert (repo / "backup" / BOGUS / "manifest").exists()
    assert (repo / "backup" / second / "manifest").exists()


def test_records_copied_in_from_elsewhere_are_never_signed_or_escrowed_by_rewrap(
    pg: PgCluster, workdir: Path
) -> None:
    """The label, period and cluster of a key record are bound by its signature. Someone who
    can add objects copies genuine records into other places: another backup's, a WAL
    period's, another cluster's (same key file, its own signing key) and an unsigned one. They
    unwrap, so a rewrap that took a set's newest record would sign and escrow the wrong data
    key for it, and the recovery key would find nothing else there. Rewrap escrows each set's
    own key; the configured key and the recovery key both still read everything."""
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    first = backup_label(dk, "--type", "full")
    pg.psql("INSERT INTO t SELECT g FROM generate_series(5001, 6000) g")
    second = backup_label(dk, "--type", "full")
    pg.psql("INSERT INTO t SELECT g FROM generate_series(6001, 7000) g")
    wait_archived(pg, switch_wal(pg))
    expected = database_checksums(pg)

    repo = dk.repo_path
    first_record = repo / "backup" / first / "key" / "0001.json"
    second_record = repo / "backup" / second / "key" / "0001.json"
    periods = sorted(p.name for p in (repo / "wal-keys").iterdir())
    # another backup's record, newest in the first backup's set
    shutil.copy(second_record, repo / "backup" / first / "key" / "0002.json")
    # a record of another cluster sharing the key file, signed by its own signing key
    assert dk.keyfile is not None
    keys = KeyfileProvider(dk.keyfile)
    other = Repository(PosixStorage(workdir / "other", name="other"), keys)
    other.initialize(4242)
    theirs = keys.new_data_key()
    foreign = other.auth.sign_key_record(theirs.record, theirs.plaintext, "backup", second)
    (repo / "backup" / second / "key" / "0002.json").write_text(json.dumps(foreign))
    # in every WAL period: a backup's record, and an unsigned record of a fresh key
    for period in periods:
        shutil.copy(first_record, repo / "wal-keys" / period / "0099.json")
        unsigned = json.dumps(keys.new_data_key().record)
        (repo / "wal-keys" / period / "0098.json").write_text(unsigned)

    dk.write_config(
        archive={"async": False, "spool_path": workdir / "spool"},
        **{"keys.escrow": {"public_key_file": offline / "recovery.pub"}},
    )
    rewrap = json.loads(dk.ok("keys", "rewrap", "--json").stdout)
    assert rewrap["skipped"] == []
    escrowed = {(r["kind"], r["name"]): r for r in rewrap["rewrapped"]}
    assert all(r["escrow_added"] for r in escrowed.values())
    # each set's new record carries the set's own key, taken from its own record
    assert escrowed[("backup", first)]["old_record"] == f"backup/{first}/key/0001.json"
    assert escrowed[("backup", second)]["old_record"] == f"backup/{second}/key/0001.json"
    for period in periods:
        assert escrowed[("wal", period)]["old_record"] == f"wal-keys/{period}/0001.json"
    dk.ok("verify")  # the configured key passes over the added records too
    grant_to_server_user(dk)  # the records rewrap (run as root) added, for the copy's wal-fetch

    # With the recovery key alone: the first backup and all the WAL after it, exactly
    target = workdir / "restored"
    recovery = offline / "recovery.key"
    dk.ok(
        "restore",
        *("--pgdata", str(target), "--backup", first, "--target-latest"),
        *("--recovery-key", str(recovery)),
    )
    restored = attach_cluster(target, pg.version, workdir, {"archive_mode": "off"})
    restored.start(timeout=120)
    try:
        restored.wait_promoted(timeout=60)
        assert database_checksums(restored) == expected
    finally:
        restored.stop()
