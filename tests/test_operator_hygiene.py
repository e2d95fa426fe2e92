"""Small things an operator runs into: temporary files killed writers leave in the repository,
a restore into a directory the restoring user cannot reach. Real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from rig.archive import DRKIT_BIN, grant_to_server_user
from rig.drkit import Drkit
from rig.postgres import PgCluster, server_user

from drkit.errors import RestoreTargetError


def test_backup_removes_stale_temporary_files_only(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    temp = dk.repo_path / ".tmp"
    temp.mkdir(exist_ok=True)
    stale = temp / "write-killed.tmp"  # a writer killed two hours ago
    stale.write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    fresh = temp / "write-busy.tmp"  # another process writing right now
    fresh.write_bytes(b"y" * 1000)

    dk.ok("backup")
    assert not stale.exists()
    assert fresh.exists()


def test_restore_below_a_directory_the_user_cannot_enter_is_a_clear_error(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    grant_to_server_user(dk)  # the server user can read the key and the repository
    locked = workdir / "locked"
    locked.mkdir(mode=0o700)  # root's: the server user cannot enter it
    target = locked / "copy"

    result = subprocess.run(
        [
            "runuser",
            "-u",
            server_user(),
            "--",
            str(DRKIT_BIN),
            "restore",
            "--config",
            str(dk.config),
            "--pgdata",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == RestoreTargetError.exit_code, result.stderr
    assert f"unable to restore to path '{target}': permission denied" in result.stderr.lower()
    assert "HINT: restore as a user who can enter every directory above it" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(locked.iterdir()) == []
