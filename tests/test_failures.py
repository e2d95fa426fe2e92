"""Bad conditions get a clear error and lose nothing: a full disk; memory stays bounded."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.drkit import DRKIT, Drkit
from rig.postgres import PgCluster


@pytest.fixture
def tiny_repo(workdir: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs where the repository goes: a disk that fills up for real."""
    path = workdir / "repo"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_fails_cleanly_and_lists_nothing(
    pg: PgCluster, workdir: Path, tiny_repo: Path
) -> None:
    pg.psql(
        "CREATE TABLE noise AS SELECT g, md5(random()::text) || md5(random()::text) AS a,"
        " md5(random()::text) AS b FROM generate_series(1, 400000) g"
    )
    dk = Drkit(pg, workdir)
    assert dk.repo_path == tiny_repo
    dk.ok("init")
    result = dk.run("backup")
    assert result.exit_code == 8, result.output
    assert "no space left on device" in result.stderr
    assert "HINT:" in result.stderr
    info = dk.info()
    assert info["backups"] == []
    # Nothing half-written stays behind in the temp area either.
    assert list((tiny_repo / ".tmp").glob("*")) == [] if (tiny_repo / ".tmp").exists() else True


def test_backup_memory_is_bounded(pg: PgCluster, workdir: Path) -> None:
    """Peak RSS of a backup of a ~330 MB database stays far below the database size."""
    pg.run_bin("pgbench", "-i", "-s", "25", "-q", "-I", "dtg")
    size = int(pg.psql("SELECT pg_database_size('postgres')"))
    assert size > 300 * 1024 * 1024
    dk = Drkit(pg, workdir, backup={"process_max": 2})
    dk.ok("init")
    # Measured by GNU time around drkit: a child forked straight from this (large) test process
    # would report the parent's memory as its own peak.
    result = subprocess.run(
        ["/usr/bin/time", "-f", "peak-kib %M", *DRKIT, "backup", "--config", str(dk.config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stderr.rsplit("peak-kib ", 1)[1].split()[0]) * 1024
    assert peak < 200 * 1024 * 1024, f"backup peak RSS {peak / 2**20:.0f} MiB"
