"""A hostile manifest cannot make a restore write outside its target, plant setuid files or links,
or pick tablespace locations; a restored copy never archives into production's repository."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from rig.archive import archiver_status, enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit, start_restored
from rig.postgres import PgCluster, database_checksums

from drkit.config.settings import load_settings
from drkit.errors import UnsafeManifest
from drkit.pg.recovery import write_restore_settings
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import DirEntry, LinkEntry, Manifest, TablespaceEntry
from drkit.repo.open import open_repository

Forgery = Callable[[Manifest, Path], Manifest]


def _with_file(manifest: Manifest, path: str) -> Manifest:
    """A copy of ``manifest`` with one more file: PG_VERSION's entry under another path."""
    version = next(f for f in manifest.files if f.path == "PG_VERSION")
    return manifest.model_copy(
        update={"files": [*manifest.files, version.model_copy(update={"path": path})]}
    )


def _setuid(manifest: Manifest, _: Path) -> Manifest:
    files = [
        f.model_copy(update={"mode": 0o4755}) if f.path == "PG_VERSION" else f
        for f in manifest.files
    ]
    return manifest.model_copy(update={"files": files})


def _link(manifest: Manifest, outside: Path) -> Manifest:
    link = LinkEntry(path="postgresql.auto.conf.d", target=str(outside))
    return manifest.model_copy(update={"links": [link]})


def _unlisted_tablespace(manifest: Manifest, _: Path) -> Manifest:
    directory = DirEntry(path="pg_tblspc/99999/PG_15_202209061", mode=0o700)
    manifest = manifest.model_copy(update={"directories": [*manifest.directories, directory]})
    return _with_file(manifest, f"{directory.path}/PG_VERSION")


FORGERIES: dict[str, tuple[Forgery, str]] = {
    "dotdot": (lambda m, o: _with_file(m, f"../{o.name}"), "not a normalised relative path"),
    "absolute": (lambda m, o: _with_file(m, str(o)), "an absolute path"),
    "setuid": (_setuid, "mode 4755 has setuid, setgid or sticky bits"),
    "symlink": (_link, "a symbolic link (to "),
    "tablespace": (_unlisted_tablespace, "not a tablespace of the backup"),
}


class Forger:
    """Rewrites a backup's manifest with the key the test owns, as an attacker with that key
    (or a forged escrow backup) could."""

    def __init__(self, dk: Drkit, label: str) -> None:
        self.repo = open_repository(load_settings(dk.config))
        self.label = BackupLabel(label)
        self.original, self.dek = self.repo.load_manifest(self.label)
        self.path = dk.repo_path / self.repo.manifest_key(self.label)

    def write(self, manifest: Manifest) -> None:
        self.path.unlink()
        self.repo.write_manifest(manifest, self.dek)


@pytest.fixture
def forged(pg: PgCluster, workdir: Path) -> tuple[Drkit, Forger]:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    return dk, Forger(dk, label)


def test_forged_manifests_are_refused_before_anything_is_written(
    forged: tuple[Drkit, Forger], workdir: Path
) -> None:
    dk, forger = forged
    for name, (forge, problem) in FORGERIES.items():
        outside = workdir / f"outside-{name}"
        target = workdir / f"restore-{name}"
        forger.write(forge(forger.original, outside))

        verify = dk.run("verify")
        assert verify.exit_code == 15, (name, verify.output)
        assert "damaged 'manifest': unsafe entry" in verify.stderr and problem in verify.stderr, (
            name,
            verify.stderr,
        )

        result = dk.run("restore", "--pgdata", str(target))
        assert result.exit_code == 18, (name, result.output)
        assert f"backup '{forger.label}' asks for what no PostgreSQL data directory holds" in (
            result.stderr
        )
        assert problem in result.stderr, (name, result.stderr)
        assert "HINT: nothing was written" in result.stderr
        assert not target.exists(), name  # not even the target directory
        assert not outside.exists(), name
    forger.write(forger.original)
    assert dk.run("verify").exit_code == 0


def test_tablespaces_go_only_where_the_operator_confirmed(
    forged: tuple[Drkit, Forger], workdir: Path
) -> None:
    dk, forger = forged
    location = workdir / "recorded-location"
    tablespace = TablespaceEntry(oid=99999, name="planted", location=str(location))
    forger.write(forger.original.model_copy(update={"tablespaces": [tablespace]}))
    target = workdir / "restore"

    result = dk.run("restore", "--pgdata", str(target))
    assert result.exit_code == 3, result.output
    assert (
        f"backup '{forger.label}' has tablespaces with no confirmed location:"
        f" 99999 (planted) at '{location}'"
    ) in result.stderr
    assert "--tablespace-map OID=DIR" in result.stderr and "--tablespace-map-all" in result.stderr
    assert not target.exists() and not location.exists()

    mapped = workdir / "mapped"
    dk.ok("restore", "--pgdata", str(target), "--tablespace-map", f"99999={mapped}")
    assert (target / "pg_tblspc" / "99999").readlink() == mapped
    assert not location.exists()


def test_a_target_root_owns_is_refused(forged: tuple[Drkit, Forger], workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the rig runs as root")
    dk, _ = forged
    target = workdir / "root-owned"
    target.mkdir(mode=0o700)  # created by root: PostgreSQL could never run in it
    result = dk.run("restore", "--pgdata", str(target))
    assert result.exit_code == 14, result.output
    assert f"unable to restore to path '{target}' because '{target}' is owned by root" in (
        result.stderr
    )
    assert "HINT: give" in result.stderr
    assert list(target.iterdir()) == []


def test_restored_files_belong_to_the_target_owner_with_postgresql_modes(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    conf = pg.pgdata / "postgresql.conf"
    conf.chmod(0o755)  # an operator's slip: restored without execute or other-read bits
    dk.ok("backup")
    target = workdir / "restore"
    dk.ok("restore", "--pgdata", str(target))
    # the same under a umask that narrows the modes files are created with
    narrow = workdir / "restore-umask"
    spawned = dk.spawn("restore", "--pgdata", str(narrow), umask=0o077)
    assert spawned.wait(timeout=120) == 0, spawned.stderr.read() if spawned.stderr else ""
    owner = workdir.stat().st_uid
    for restored in (target, narrow):
        for path in [restored, *restored.rglob("*")]:
            st = path.lstat()
            assert st.st_uid == owner, path
            mode = st.st_mode & 0o7777
            expected = (0o700, 0o750) if path.is_dir() else (0o600, 0o640)
            assert mode in expected, (path, oct(mode))
        assert (restored / "postgresql.conf").stat().st_mode & 0o7777 == 0o640  # group read kept


def test_restore_settings_are_never_written_through_a_link(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (pgdata / "postgresql.auto.conf").symlink_to(victim)
    fd = os.open(pgdata, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafeManifest, match="is a symbolic link"):
            write_restore_settings(fd, archive_off=True, restore_command="", target=None)
    finally:
        os.close(fd)
    assert victim.read_text() == "untouched\n"


def test_the_startup_sync_is_syncfs_unless_the_restored_configuration_chose(
    tmp_path: Path,
) -> None:
    """A restored cluster syncs its data directory when it starts: syncfs, one call, instead of
    an fsync of every file; a method the restored configuration sets is kept."""
    for chosen in ("", "recovery_init_sync_method = fsync\n"):
        pgdata = tmp_path / f"pgdata{len(chosen)}"
        pgdata.mkdir()
        (pgdata / "postgresql.conf").write_text(f"port = 5432\n{chosen}")
        fd = os.open(pgdata, os.O_RDONLY | os.O_DIRECTORY)
        try:
            write_restore_settings(
                fd, archive_off=False, restore_command="", target=None, init_sync=True
            )
        finally:
            os.close(fd)
        auto = (pgdata / "postgresql.auto.conf").read_text() if not chosen else ""
        assert ("recovery_init_sync_method = 'syncfs'" in auto) == (not chosen)
        assert (pgdata / "postgresql.auto.conf").exists() == (not chosen)


def test_a_restored_copy_never_archives_into_the_source_repository(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    dk.ok("backup")
    wait_archived(pg, switch_wal(pg))

    target = workdir / "copy"
    result = dk.ok("restore", "--pgdata", str(target))
    assert "archive_mode = off in postgresql.auto.conf" in result.stdout
    before = dk.repo_listing()
    copy = start_restored(target, pg.version, workdir)
    assert copy.psql("SHOW archive_mode") == "off"
    copy.psql("INSERT INTO t SELECT generate_series(1, 1000)")
    for _ in range(3):
        switch_wal(copy)
    copy.psql("CHECKPOINT")
    assert archiver_status(copy)[1:] == (0, 0)
    assert dk.repo_listing() == before  # not one object from the copy

    # Production's own archiving goes on as before, and the archive verifies
    pg.psql("INSERT INTO t SELECT generate_series(1, 1000)")
    name = switch_wal(pg)
    wait_archived(pg, name)
    assert archiver_status(pg)[2] == 0
    assert dk.ok("verify", "--wal").exit_code == 0
    assert database_checksums(copy) != database_checksums(pg)  # two clusters, each its own


def test_archive_mode_preserve_keeps_the_source_setting(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    dk.ok("backup")
    target = workdir / "failover"
    result = dk.ok("restore", "--pgdata", str(target), "--archive-mode", "preserve")
    assert "archive_mode = off" not in result.stdout
    assert "archive_mode" not in (target / "postgresql.auto.conf").read_text()
