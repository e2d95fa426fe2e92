"""WAL prefetch with real PostgreSQL: the restore_command drkit restore writes (``wal-fetch
--prefetch``) starts a background fetcher that fetches the next segments ahead of replay.

What a user relies on: recovery still stops exactly at its target, a damaged segment ahead is
never handed over (recovery aborts when it reaches it), no fetcher is left running once recovery
ended, and a spool that cannot take more only slows recovery down to direct fetching.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rig.archive import DRKIT_BIN, enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, _as_server_user, attach_cluster, chown_to_server_user

from drkit.errors import IntegrityError, ServerControlError
from drkit.repo.wal_names import parse_wal_name
from drkit.restore.request import QUICK_FETCH
from drkit.wal.config import load_wal_config
from drkit.wal.prefetch import KEEP, STALE, spool_path

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
    pg: PgCluster, workdir: Path, s3: Any, new_bucket: Any
) -> None:
    bucket = new_bucket()  # its env: the restored server's wal-fetch too
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


# -- the fetcher on its own: a data directory that looks recovering to it, a real archive ----------

SEGMENT_SIZE = 16 * 1024 * 1024
SPOOL_AT_REST = ["fetcher.lock", "fetcher.log", "want"]  # no segment left


class Recovering:
    """A data directory the fetcher takes for a recovering server's (the primary's postmaster,
    recovery.signal) with its spool; ``start`` runs ``drkit wal-fetcher`` as the server user."""

    def __init__(self, pg: PgCluster, dk: Drkit) -> None:
        self.dk = dk
        self.pgdata = dk.workdir / "recovering"
        self.pgdata.mkdir(mode=0o700)
        (self.pgdata / "postmaster.pid").write_text((pg.pgdata / "postmaster.pid").read_text())
        (self.pgdata / "recovery.signal").touch()
        chown_to_server_user(self.pgdata, recursive=True)
        self.spool = spool_path(load_wal_config(dk.config), self.pgdata)
        self.spool.mkdir(mode=0o700)
        chown_to_server_user(self.spool)

    def want(self, name: str) -> None:
        """PostgreSQL asks for ``name`` (what its wal-fetch writes to the spool)."""
        temporary = self.spool / ".want.test.tmp"
        temporary.write_text(name + "\n")
        chown_to_server_user(temporary)
        temporary.rename(self.spool / "want")

    def start(self, idle: float) -> subprocess.Popen[bytes]:
        command = [str(DRKIT_BIN), "wal-fetcher", "--config", str(self.dk.config)]
        command += ["--pgdata", str(self.pgdata), "--segment-size", str(SEGMENT_SIZE)]
        log = self.spool / "fetcher.log"
        log.touch(mode=0o600)
        chown_to_server_user(log)
        with log.open("ab") as output:  # where wal-fetch sends a fetcher's output
            return subprocess.Popen(
                _as_server_user([*command, "--idle", str(idle)]), stdout=output, stderr=output
            )

    def log(self) -> str:
        log = self.spool / "fetcher.log"
        return log.read_text() if log.exists() else ""


def wait_for_log(recovering: Recovering, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in recovering.log():
        assert time.monotonic() < deadline, f"no {text!r} in fetcher.log: {recovering.log()}"
        time.sleep(0.05)


def archived(pg: PgCluster, workdir: Path, segments: int) -> tuple[Drkit, list[str]]:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, fetch_ahead=3)
    return dk, archive_batches(pg, dk, segments)


def test_an_idle_fetcher_exits_and_leaves_no_segment(pg: PgCluster, workdir: Path) -> None:
    dk, segments = archived(pg, workdir, 4)
    recovering = Recovering(pg, dk)
    recovering.want(segments[0])
    fetcher = recovering.start(idle=1)
    assert fetcher.wait(timeout=15) == 0  # no request after the first: it exits on its own
    assert sorted(fetched_ahead(recovering.spool)) == segments[1:4]
    assert "stopped fetching ahead: no request for 1s" in recovering.log()
    assert not fetchers(recovering.pgdata)
    assert sorted(p.name for p in recovering.spool.iterdir()) == SPOOL_AT_REST


def test_a_timeline_switch_stops_the_fetcher_and_empties_the_spool(
    pg: PgCluster, workdir: Path
) -> None:
    dk, segments = archived(pg, workdir, 4)
    recovering = Recovering(pg, dk)
    recovering.want(segments[0])
    fetcher = recovering.start(idle=30)
    for name in segments[1:4]:
        wait_for_log(recovering, f"fetched {name} ahead")
    assert (recovering.spool / segments[1]).exists()
    asked = "00000002" + segments[1][8:]
    recovering.want(asked)
    assert fetcher.wait(timeout=15) == 0
    assert f"stopped fetching ahead: PostgreSQL asked for {asked}" in recovering.log()
    assert sorted(p.name for p in recovering.spool.iterdir()) == SPOOL_AT_REST


def test_what_was_not_fetched_ahead_is_answered_by_the_fetcher_without_the_full_command(
    pg: PgCluster, workdir: Path
) -> None:
    """What recovery asks for at its end: the last segment again, the segment after the
    archive's end (twice), history files that are not archived."""
    dk, segments = archived(pg, workdir, 2)
    recovering = Recovering(pg, dk)
    (recovering.pgdata / "pg_wal").mkdir(mode=0o700)
    chown_to_server_user(recovering.pgdata / "pg_wal")
    recovering.want(segments[0])
    fetcher = recovering.start(idle=30)
    wait_for_log(recovering, f"fetched {segments[1]} ahead")
    ran = workdir / "full-command-ran"

    def request(name: str) -> int:
        full = ["/bin/sh", "-c", f'echo "$@" >> {ran}; exit 1', "sh"]
        quick = [sys.executable, "-I", "-S", str(QUICK_FETCH), "--spool-root"]
        quick += [str(recovering.spool.parent), "--", *full, name, "pg_wal/RECOVERYXLOG"]
        done = subprocess.run(_as_server_user(quick), cwd=recovering.pgdata, timeout=60)
        return done.returncode

    direct = workdir / "direct"
    dk.ok("wal-fetch", segments[0], str(direct))
    assert request(segments[0]) == 0  # asked for again: fetched for this request
    assert (recovering.pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == direct.read_bytes()
    after = segments[1][:16] + f"{int(segments[1][16:], 16) + 1:08X}"
    assert request(after) == 1  # not archived, as the repository says now
    assert request(after) == 1
    assert request("00000002.history") == 1
    assert not ran.exists()  # none of them needed the full command
    assert fetcher.poll() is None  # the history file asked for did not stop it
    assert recovering.log().count(f"fetched {segments[0]} ") == 1  # on request, and only once
    recovering.want("00000002" + segments[1][8:])
    assert fetcher.wait(timeout=15) == 0
    assert sorted(p.name for p in recovering.spool.iterdir()) == SPOOL_AT_REST


def test_a_starting_fetcher_removes_stale_spools_only(pg: PgCluster, workdir: Path) -> None:
    dk, segments = archived(pg, workdir, 2)
    root = workdir / "spool"
    outside = workdir / "precious"
    outside.write_text("keep me")
    old = time.time() - STALE - 60

    def make_spool(name: str, *files: str, age: float = old) -> Path:
        spool = root / name
        spool.mkdir(mode=0o700)
        for file in files:
            (spool / file).write_text("x")
        chown_to_server_user(spool, recursive=True)
        os.utime(spool, (age, age))
        return spool

    stale = make_spool("fetch-0000000000a1", *KEEP, segments[0], segments[0] + ".info")
    recent = make_spool("fetch-0000000000a2", *KEEP, age=time.time())
    held = make_spool("fetch-0000000000a3", *KEEP)
    foreign = make_spool("fetch-0000000000a4", "fetcher.log")
    os.symlink(outside, foreign / "want")
    if os.geteuid() == 0:
        os.lchown(foreign / "want", *_postgres_ids())
    os.utime(foreign, (old, old))
    with open(held / "fetcher.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a fetcher runs there
        recovering = Recovering(pg, dk)
        recovering.want(segments[0])
        assert recovering.start(idle=0.2).wait(timeout=15) == 0
    assert not stale.exists()
    assert f"removed stale spool '{stale}'" in recovering.log()
    assert sorted(p.name for p in recent.iterdir()) == sorted(KEEP)
    assert sorted(p.name for p in held.iterdir()) == sorted(KEEP)
    assert sorted(p.name for p in foreign.iterdir()) == ["fetcher.log", "want"]  # a link: not ours
    assert outside.read_text() == "keep me"
    assert recovering.spool.is_dir()  # its own, with its log


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid
