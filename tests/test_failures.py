"""Bad conditions get a clear error and lose nothing: a full disk; memory stays bounded."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.drkit import DRKIT, Drkit
from rig.postgres import PgCluster, chown_to_server_user


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


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _finish(process: subprocess.Popen[str], what: str) -> tuple[int, str]:
    """Wait for a drkit process; a hang fails the test (and the process is killed)."""
    try:
        _, stderr = process.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
        _, stderr = process.communicate()
        pytest.fail(f"drkit {what} hung for {HANG_TIMEOUT_S} s: {stderr}")
    return process.returncode, stderr


HANG_TIMEOUT_S = 120  # the backup takes seconds (a minute on a loaded machine); a hang never ends


def test_full_disk_backup_exits_and_the_next_one_succeeds(
    pg: PgCluster, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command line (whose exit waits for every thread) on a real 20 MiB tmpfs: the
    backup fails with the no-space error and exits, lists nothing, and once there is space
    again the next backup succeeds. A restore onto a full file system fails cleanly too."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    repo = workdir / "repo"
    _tmpfs(repo, "20m")
    try:
        pg.psql(
            "CREATE TABLE noise AS SELECT g, md5(random()::text) || md5(random()::text) AS a,"
            " md5(random()::text) AS b FROM generate_series(1, 600000) g"
        )
        dk = Drkit(pg, workdir)
        dk.ok("init")
        code, stderr = _finish(dk.spawn("backup"), "backup")
        assert code == 8, stderr
        assert "no space left on device" in stderr and "HINT:" in stderr
        assert dk.info()["backups"] == []

        subprocess.run(["mount", "-o", "remount,size=400m", str(repo)], check=True)
        code, stderr = _finish(dk.spawn("backup"), "backup")
        assert code == 0, stderr
        info = dk.info()
        assert [b["type"] for b in info["backups"]] == ["full"]
        assert info["incomplete"] == []

        target = workdir / "target"
        _tmpfs(target, "8m")
        chown_to_server_user(target)  # the restored cluster's user owns the target
        try:
            code, stderr = _finish(dk.spawn("restore", "--pgdata", str(target)), "restore")
            assert code == 14 and "Traceback" not in stderr, stderr
            assert "no space left on device" in stderr
            assert list(target.iterdir()) == []  # nothing half-restored that could be started
        finally:
            subprocess.run(["umount", "-l", str(target)], check=False)
    finally:
        subprocess.run(["umount", "-l", str(repo)], check=False)
