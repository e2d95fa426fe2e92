"""Lock and spool directories another local user could have planted: drkit never writes through
them (a symlinked lock file, a foreign or group-writable directory) and says why."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rig.drkit import Drkit
from rig.postgres import PgCluster

from drkit.config.settings import load_settings
from drkit.crypto.keyfile import create_keyfile
from drkit.private_dir import default_lock_path
from drkit.repo.open import repo_location

DRKIT = [sys.executable, "-m", "drkit"]
VICTIM = b"pg_control of production: must stay as it is\n" * 20


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    return victim


def test_backup_refuses_a_symlink_planted_at_its_lock_file(
    pg: PgCluster, workdir: Path, tmp_path: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    settings = load_settings(dk.config)
    digest = hashlib.sha256(repo_location(settings.repo[0]).encode()).hexdigest()[:16]
    locks = settings.lock_path
    locks.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    (locks / f"backup-{digest}.lock").symlink_to(victim)
    before = dk.repo_listing()

    result = dk.run("backup")
    assert result.exit_code == 17, result.output
    assert f"refusing to use lock file '{locks}/backup-{digest}.lock'" in result.stderr
    assert "it is a symbolic link" in result.stderr
    assert "HINT:" in result.stderr
    assert victim.read_bytes() == VICTIM
    assert dk.repo_listing() == before

    # Once the link is gone, the lock file is drkit's own: a backup runs and the lock survives it
    (locks / f"backup-{digest}.lock").unlink()
    dk.ok("backup")
    lock = locks / f"backup-{digest}.lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    assert lock.read_text().strip().isdigit()


def _async_rig(tmp_path: Path, spool: Path) -> tuple[Path, Path]:
    from drkit.crypto.keyfile import KeyfileProvider
    from drkit.repo.repository import Repository
    from drkit.storage.posix import PosixStorage

    keyfile = tmp_path / "backup.key"
    create_keyfile(keyfile)
    repo = tmp_path / "repo"
    Repository(PosixStorage(repo), KeyfileProvider(keyfile)).initialize("7000000000000000001")
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    segment = pgdata / "pg_wal" / "000000010000000000000003"
    segment.write_bytes(bytes(16 * 1024 * 1024))
    (pgdata / "pg_wal" / "archive_status" / f"{segment.name}.ready").touch()
    config = tmp_path / "drkit.toml"
    config.write_text(
        f'lock_path = "{tmp_path / "locks"}"\n[postgres]\npgdata = "{pgdata}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{keyfile}"\n'
        f'[[repo]]\nname = "local"\npath = "{repo}"\n'
        f'[archive]\nasync = true\nspool_path = "{spool}"\npush_timeout = 5\n'
    )
    return config, pgdata


def _wal_push(config: Path, pgdata: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DRKIT, "wal-push", "pg_wal/000000010000000000000003", "--config", str(config)],
        cwd=pgdata,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_async_wal_push_refuses_a_symlinked_pusher_lock(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    (spool / "pusher.lock").symlink_to(victim)
    config, pgdata = _async_rig(tmp_path, spool)

    result = _wal_push(config, pgdata)
    assert result.returncode == 17, result.stderr
    assert f"refusing to use lock file '{spool}/pusher.lock': it is a symbolic link" in (
        result.stderr
    )
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("how", ["link", "group-writable", "foreign"])
def test_async_wal_push_refuses_a_spool_directory_it_does_not_own_alone(
    tmp_path: Path, how: str
) -> None:
    spool = tmp_path / "spool"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if how == "link":
        spool.symlink_to(elsewhere)
        expected = f"refusing to use '{spool}': it is a symbolic link"
    elif how == "group-writable":
        spool.mkdir()
        spool.chmod(0o770)
        expected = f"refusing to use directory '{spool}': it is writable by group or others"
    else:
        if os.geteuid() != 0:
            pytest.fail("the rig runs as root, to give the directory to another user")
        spool.mkdir(mode=0o700)
        os.chown(spool, 65534, 65534)  # nobody
        expected = f"refusing to use directory '{spool}': it is owned by 'nobody', not by 'root'"
    config, pgdata = _async_rig(tmp_path, spool)

    result = _wal_push(config, pgdata)
    assert result.returncode == 17, result.stderr
    assert expected in result.stderr
    assert "set lock_path (or [archive] spool_path) to a directory that only" in result.stderr
    assert list(elsewhere.iterdir()) == []
    if how != "link":
        assert list(spool.iterdir()) == []


def test_default_lock_path_is_private_per_user() -> None:
    assert default_lock_path() == (
        Path("/run/drkit") if os.geteuid() == 0 else Path.home() / ".drkit"
    )
    as_postgres = subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            sys.executable,
            "-c",
            "from drkit.private_dir import default_lock_path; print(default_lock_path())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    import pwd

    assert as_postgres.stdout.strip() == f"{pwd.getpwnam('postgres').pw_dir}/.drkit"
