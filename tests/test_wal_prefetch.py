"""WAL prefetch with real PostgreSQL: the restore_command drkit restore writes (``wal-fetch
--prefetch``) starts a background fetcher that fetches the next segments ahead of replay.

What a user relies on: recovery still stops exactly at its target, a damaged segment ahead is
never handed over (recovery aborts when it reaches it), no fetcher is left running once recovery
ended, and a spool that cannot take more only slows recovery down to direct fetching.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster

from drkit.errors import IntegrityError, ServerControlError
from drkit.repo.wal_names import parse_wal_name

NO_ARCHIVING = {"archive_mode": "off"}
ROWS = "SELECT * FROM ledger ORDER BY id"


def archive_batches(pg: PgCluster, dk: Drkit, batches: int, *, mark_after: int = 0) -> list[str]:
    """A backup, then ``batches`` batches of rows, each in its own archived segment; returns
    the segments' names. After batch ``mark_after`` a restore point named 'mark'."""
    pg.psql("CREATE TABLE ledger (id int PRIMARY KEY, batch int, v text)")
    dk.ok("backup")
    segments = []
    for batch in range(1, batches + 1):
        pg.psql(
            f"INSERT INTO ledger SELECT g, {batch}, md5(g::text)"
            f" FROM generate_series({batch * 100}, {batch * 100 + 99}) g"
        )
        if batch == mark_after:
            pg.psql("SELECT pg_create_restore_point('mark')")
        segments.append(switch_wal(pg))
    wait_archived(pg, segments[-1])
    return segments


def restore(dk: Drkit, workdir: Path, *target: str) -> PgCluster:
    pgdata = workdir / "restored"
    dk.ok("restore", "--pgdata", str(pgdata), *target)
    assert "wal-fetch --prefetch" in (pgdata / "postgresql.auto.conf").read_text()
    return attach_cluster(pgdata, dk.cluster.version, workdir, NO_ARCHIVING)


def spool_of(dk: Drkit) -> Path:
    (spool,) = (dk.workdir / "spool").glob("fetch-*")
    return spool


def fetched_ahead(spool: Path) -> list[str]:
    """The segments the fetcher fetched ahead, from its log (JSON lines)."""
    messages = [json.loads(line)["message"] for line in (spool / "fetcher.log").open()]
    return [m.split()[1] for m in messages if m.startswith("fetched ") and m.endswith(" ahead")]


def fetchers(pgdata: Path) -> list[int]:
    """The wal-fetcher processes working for the cluster in ``pgdata``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"wal-fetcher" in argv and str(pgdata).encode() in argv:
            found.append(int(entry.name))
    return found


def wait_no_fetcher(pgdata: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while fetchers(pgdata):
        assert time.monotonic() < deadline, f"wal-fetcher still running: {fetchers(pgdata)}"
        time.sleep(0.05)


def test_recovery_stops_at_a_target_inside_the_fetched_range(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, fetch_ahead=8)
    segments = archive_batches(pg, dk, 14, mark_after=8)
    at_mark = pg.psql("SELECT * FROM ledger WHERE batch <= 8 ORDER BY id")
    assert at_mark.count("\n") == 8 * 100 - 1

    restored = restore(dk, workdir, "--target-name", "mark")
    restored.start(timeout=120)
    restored.wait_promoted(timeout=120)
    assert restored.psql(ROWS) == at_mark  # row by row: batches 1-8, nothing after the mark
    wait_no_fetcher(restored.pgdata)  # recovery ended: the fetcher is gone

    spool = spool_of(dk)
    ahead = fetched_ahead(spool)
    assert ahead, (spool / "fetcher.log").read_text()
    # It fetched past the target, and recovery stopped at the target all the same
    assert max(ahead) > segments[7], ahead
    assert sorted(p.name for p in spool.iterdir()) == [
        "fetcher.lock",
        "fetcher.log",
        "started",
        "want",
    ]


def test_a_damaged_segment_ahead_is_never_served(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, fetch_ahead=8)
    segments = archive_batches(pg, dk, 10)
    damaged = segments[7]
    obj = dk.repo_path / parse_wal_name(damaged).key
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.chmod(0o640)
    obj.write_bytes(bytes(data))

    restored = restore(dk, workdir, "--target-latest")
    with pytest.raises(ServerControlError):
        restored.start(timeout=120)
        restored.wait_promoted(timeout=120)
    log = restored.log_file.read_text()
    assert f"exit code {200 + IntegrityError.exit_code}" in log, log[-3000:]
    assert f'could not restore file "{damaged}"' in log, log[-3000:]
    assert not restored.is_running()
    wait_no_fetcher(restored.pgdata)
    fetcher_log = (spool_of(dk) / "fetcher.log").read_text()
    assert f"{damaged} not fetched ahead" in fetcher_log, fetcher_log
    assert damaged not in fetched_ahead(spool_of(dk))


def test_segments_missing_from_the_primary_are_fetched_ahead_from_s3(
    pg: PgCluster, workdir: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)  # the restored server's wal-fetch inherits them
    bucket = f"drkit-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    offsite = {
        "name": "offsite",
        "type": "s3",
        "bucket": bucket,
        "endpoint_url": s3.endpoint_url,
        "region": "us-east-1",
        "offsite": True,
    }
    dk = Drkit(pg, workdir, extra_repos=[offsite])
    dk.ok("init")
    enable_archiving(pg, dk, fetch_ahead=4)
    segments = archive_batches(pg, dk, 8)
    expected = pg.psql(ROWS)
    dk.ok("replicate")
    restored = restore(dk, workdir, "--target-latest")
    lost = segments[2:7]
    for name in lost:  # gone from the local repository after the restore, intact in S3
        (dk.repo_path / parse_wal_name(name).key).unlink()
    restored.start(timeout=120)
    restored.wait_promoted(timeout=120)
    assert restored.psql(ROWS) == expected
    wait_no_fetcher(restored.pgdata)
    ahead = set(fetched_ahead(spool_of(dk)))
    assert ahead & set(lost), ahead
    log = restored.log_file.read_text()
    for name in lost:  # served from the spool or fetched directly: each says where it came from
        assert f"WAL file {name} fetched from 'offsite' (missing there)" in log, log[-3000:]


def _small_tmpfs(path: Path) -> None:
    uid = int(subprocess.run(["id", "-u", "postgres"], capture_output=True, text=True).stdout)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size=20m,mode=0700,uid={uid}", "tmpfs", str(path)],
        check=True,
    )


@pytest.mark.parametrize("spool", ["full", "unwritable"])
def test_a_spool_that_cannot_take_more_falls_back_to_direct_fetch(
    pg: PgCluster, workdir: Path, spool: str
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, fetch_ahead=8)
    archive_batches(pg, dk, 8)
    expected = pg.psql(ROWS)
    root = workdir / "spool"
    if spool == "full":  # room for one 16 MiB segment, not two
        _small_tmpfs(root)
    else:  # the fetch spool cannot be created in it
        root.chmod(0o500)
    try:
        restored = restore(dk, workdir, "--target-latest")
        restored.start(timeout=120)
        restored.wait_promoted(timeout=120)
        assert restored.psql(ROWS) == expected
        wait_no_fetcher(restored.pgdata)
        log = restored.log_file.read_text()
        assert "drkit wal-fetch: error" not in log, log[-3000:]
        if spool == "full":
            fetcher_log = (spool_of(dk) / "fetcher.log").read_text()
            assert "the spool takes no more segments" in fetcher_log, fetcher_log
            assert "no space left on device" in fetcher_log
        else:
            assert "not fetching WAL ahead: cannot create directory" in log, log[-3000:]
            assert not list(root.iterdir())
    finally:
        if spool == "full":
            subprocess.run(["umount", "--lazy", str(root)], check=True)
