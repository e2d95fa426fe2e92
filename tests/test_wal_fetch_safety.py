"""wal-fetch never answers "not archived" (exit 1) when it cannot know: a repository that is not
there (no format object, a moved directory, a missing bucket) or a damaged copy in any repository
is an error above 125, so PostgreSQL aborts recovery instead of promoting at the wrong point.

Through the real command line, as PostgreSQL's restore_command runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rig.archive import DRKIT_BIN
from rig.postgres import server_user
from rig.servers import S3Server

from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.errors import IntegrityError, RepositoryMissing, StorageError
from drkit.repo.repository import FORMAT_KEY, Repository
from drkit.repo.wal_names import parse_wal_name
from drkit.storage.posix import PosixStorage

SYSID = 7300000000000000002
SEGSIZE = 1024 * 1024
NAME = "000000010000000000000003"
DRKIT = [sys.executable, "-m", "drkit"]


def segment_bytes() -> bytes:
    """WAL segment 3 of timeline 1 as far as drkit looks (a valid long page header)."""
    import struct

    body = bytearray(os.urandom(4096) * (SEGSIZE // 4096))
    body[:40] = struct.pack("<HHIQIxxxxQII", 0xD110, 2, 1, 3 * SEGSIZE, 0, SYSID, SEGSIZE, 8192)
    return bytes(body)


class Rig:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.keyfile = root / "backup.key"
        create_keyfile(self.keyfile)
        self.pgdata = root / "pgdata"
        (self.pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
        self.primary = root / "primary"
        self.secondary = root / "secondary"
        Repository(PosixStorage(self.primary), KeyfileProvider(self.keyfile)).initialize(SYSID)
        self.config = root / "drkit.toml"
        self.write_config()

    def write_config(self, *extra_repos: str) -> None:
        lines = [
            f'lock_path = "{self.root / "locks"}"',
            "[postgres]",
            f'pgdata = "{self.pgdata}"',
            "[keys]",
            'provider = "keyfile"',
            f'keyfile = "{self.keyfile}"',
            "[[repo]]",
            'name = "primary"',
            f'path = "{self.primary}"',
            *extra_repos,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DRKIT, *args, "--config", str(self.config)],
            cwd=self.pgdata,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )

    def push(self) -> None:
        (self.pgdata / "pg_wal" / NAME).write_bytes(segment_bytes())
        pushed = self.run("wal-push", f"pg_wal/{NAME}")
        assert pushed.returncode == 0, pushed.stderr

    def fetch(self, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("wal-fetch", NAME, str(self.root / "RECOVERYXLOG"), env=env)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def assert_aborts(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == 200 + code, result.stderr
    assert result.returncode > 125  # PostgreSQL aborts recovery
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_repository_without_its_format_object_is_an_error(rig: Rig, tmp_path: Path) -> None:
    assert rig.fetch().returncode == 1  # there, and the file is not archived: the end of WAL
    (rig.primary / FORMAT_KEY).unlink()  # e.g. an empty mount point
    result = rig.fetch()
    assert_aborts(
        result,
        RepositoryMissing.exit_code,
        f"repository 'primary' is not initialized: no format object in directory '{rig.primary}'",
        "mounted",
    )
    assert "drkit init" not in result.stderr  # a restore never creates a repository
    assert not (tmp_path / "RECOVERYXLOG").exists()


def test_a_moved_repository_directory_is_an_error(rig: Rig) -> None:
    rig.push()
    assert rig.fetch().returncode == 0
    rig.primary.rename(rig.root / "moved")
    assert_aborts(rig.fetch(), RepositoryMissing.exit_code, f"directory '{rig.primary}'")
    assert not rig.primary.exists()  # fetching creates nothing


def test_a_missing_bucket_is_an_error(rig: Rig, s3: S3Server) -> None:
    bucket = f"drkit-{uuid.uuid4().hex[:12]}"  # never created
    rig.write_config()
    text = rig.config.read_text().replace(
        f'name = "primary"\npath = "{rig.primary}"',
        f'name = "offsite"\ntype = "s3"\nbucket = "{bucket}"\nprefix = "prod"\n'
        f'endpoint_url = "{s3.endpoint_url}"\nregion = "us-east-1"\nmax_attempts = 1',
    )
    rig.config.write_text(text)
    assert_aborts(rig.fetch(env=s3.env()), RepositoryMissing.exit_code, f"bucket '{bucket}'")


def _secondary_with_a_copy(rig: Rig) -> Path:
    """The segment archived in the primary, copied (as replicate does) to the secondary, then
    gone from the primary; returns the secondary's copy."""
    rig.push()
    shutil.copytree(rig.primary, rig.secondary)
    key = parse_wal_name(NAME).key
    (rig.primary / key).unlink()
    rig.write_config("[[repo]]", 'name = "secondary"', f'path = "{rig.secondary}"')
    return rig.secondary / key


def test_a_damaged_copy_in_the_secondary_is_an_error(rig: Rig, tmp_path: Path) -> None:
    copy = _secondary_with_a_copy(rig)
    fetched = rig.fetch()
    assert fetched.returncode == 0, fetched.stderr
    assert "fetched from 'secondary' (missing there)" in fetched.stderr
    (tmp_path / "RECOVERYXLOG").unlink()

    copy.chmod(0o640)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    result = rig.fetch()
    assert_aborts(result, IntegrityError.exit_code)
    assert not (tmp_path / "RECOVERYXLOG").exists()


def test_a_secondary_that_is_not_there_is_an_error(rig: Rig) -> None:
    _secondary_with_a_copy(rig)
    rig.secondary.rename(rig.root / "unmounted")
    rig.secondary.mkdir()  # the empty mount point
    assert_aborts(rig.fetch(), RepositoryMissing.exit_code, "'secondary'")


def test_a_repository_the_server_user_cannot_read_is_an_error(workdir: Path) -> None:
    rig = Rig(workdir)  # a directory the server user can traverse
    rig.primary.chmod(0o700)  # root's, as a mount point with the wrong owner or mode
    dest = workdir / "RECOVERYXLOG"
    result = subprocess.run(
        [
            *("runuser", "-u", server_user(), "--", str(DRKIT_BIN), "wal-fetch", NAME),
            *(str(dest), "--config", str(rig.config)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_aborts(result, StorageError.exit_code, "permission denied")
    assert not dest.exists()
