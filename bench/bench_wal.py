"""WAL archiving throughput: drkit wal-push (synchronous and asynchronous) beside pgBackRest's
archive-push, on real 16 MiB segments of pgbench WAL, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages) and pgbackrest:

    .venv/bin/python bench/bench_wal.py [--segments 48] [--keep]

What it does:

1. Builds a PostgreSQL 15 cluster (the test rig's), runs ``pgbench -i -s 20`` and then pgbench
   traffic until ``--segments`` new segments have been archived by ``cp`` into a directory: real
   steady-state WAL with full-page writes, not synthetic data. pgBackRest's stanza is created while
   the cluster runs; then the cluster is stopped.
2. Puts those segments back into the stopped cluster's ``pg_wal`` with ``.ready`` files and, for
   each tool and mode, plays PostgreSQL's archiver: one archive_command process per segment, in
   order, as the ``postgres`` user with PGDATA as working directory, marking ``.ready`` as ``.done``
   after each success. Every run starts from an empty repository with a warm page cache (segments
   PostgreSQL just wrote are in memory).
3. Prints segments/s, MiB/s of WAL, per-call latency (median, p95) and the stored size.

Both tools encrypt (drkit AES-256-GCM, pgBackRest aes-256-cbc) and compress with zstd; pgBackRest at
level 3 (asked for as the baseline), drkit at its WAL default (level 1) and at 3. Async modes use
``process_max`` 2 (the machine has 2 cores).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shutil
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import DRKIT, PG_VERSION, machine_busy_seconds, wait_until_quiet
from rig.postgres import (
    PgCluster,
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
    make_template,
    stop_clusters_under,
)

from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage
from drkit.wal.spool import LOCK_FILE

MiB = 1024 * 1024
SEGMENT = 16 * MiB
PROCESS_MAX = 2


@dataclass
class Run:
    tool: str
    mode: str
    segments: int
    wall_s: float
    latencies: list[float]
    stored: int
    busy: float  # CPUs the whole machine kept busy during the run (2 = both cores)

    def row(self) -> str:
        rate = self.segments / self.wall_s
        lat = sorted(self.latencies)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        return (
            f"| {self.tool:<24} | {self.mode:<5} | {rate:7.1f} | {rate * SEGMENT / MiB:7.0f} |"
            f" {statistics.median(lat) * 1000:7.0f} | {p95 * 1000:7.0f} |"
            f" {self.stored / (self.segments * SEGMENT):6.3f} | {self.busy:4.2f} |"
        )


PG_USER = "postgres" if os.geteuid() == 0 else None  # archive_command runs as the server user


def run_as_postgres(
    cmd: list[str], cwd: Path, *, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=check,
        user=PG_USER,
        group=PG_USER,
        extra_groups=[] if PG_USER else None,
    )


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- real pgbench WAL ---------------------------------------------------------------------------


def make_segments(root: Path, count: int) -> tuple[PgCluster, Path, list[str]]:
    """A running cluster and ``count`` segments of its pgbench WAL, archived by cp."""
    archive = make_rig_dir(root, "segments-")
    cluster = clone_cluster(
        make_template(PG_VERSION, root),
        PG_VERSION,
        root,
        {
            "archive_mode": "on",
            "archive_command": f"cp %p {archive}/%f",
            "max_wal_size": "2GB",
            "checkpoint_timeout": "60s",  # checkpoints during the run: full-page writes, as in life
            "shared_buffers": "128MB",
        },
    )
    cluster.start()
    print("building pgbench scale 20 ...", flush=True)
    cluster.run_bin("pgbench", "-i", "-s", "20", "-q")
    cluster.psql("CHECKPOINT")
    before = {p.name for p in archive.iterdir()}
    print(f"running pgbench until {count} segments are archived ...", flush=True)
    deadline = time.monotonic() + 900
    while True:
        new = sorted(
            p.name for p in archive.iterdir() if p.name not in before and len(p.name) == 24
        )
        if len(new) >= count + 1 or time.monotonic() > deadline:
            break
        cluster.run_bin("pgbench", "-c", "4", "-j", "2", "-T", "10", "-n")
    names = new[1 : count + 1]  # the first new one may hold the tail of pgbench -i
    if len(names) < count:
        raise SystemExit(f"only {len(names)} segments archived")
    return cluster, archive, names


# -- the tools ----------------------------------------------------------------------------------


class Drkit:
    def __init__(self, root: Path, pgdata: Path, system_identifier: int) -> None:
        self.dir = make_rig_dir(root, "drkit-")
        self.pgdata = pgdata
        self.system_identifier = system_identifier
        self.keyfile = self.dir / "backup.key"
        create_keyfile(self.keyfile)
        chown_to_server_user(self.keyfile)
        self.config = self.dir / "drkit.toml"

    def prepare(self, *, async_: bool, level: int) -> Path:
        repo = self.dir / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        Repository(PosixStorage(repo), KeyfileProvider(self.keyfile)).initialize(
            self.system_identifier
        )
        chown_to_server_user(repo, recursive=True)
        spool = self.dir / "spool"
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(mode=0o700)
        chown_to_server_user(spool)
        self.config.write_text(
            f'lock_path = "{self.dir / "locks"}"\n'
            f'[postgres]\npgdata = "{self.pgdata}"\n'
            f'[keys]\nkeyfile = "{self.keyfile}"\n'
            f'[[repo]]\nname = "bench"\npath = "{repo}"\n'
            f"[archive]\nasync = {'true' if async_ else 'false'}\nprocess_max = {PROCESS_MAX}\n"
            f'compress_level = {level}\nspool_path = "{spool}"\n'
        )
        return repo

    def command(self, name: str) -> list[str]:
        return [str(DRKIT), "wal-push", "--config", str(self.config), f"pg_wal/{name}"]

    def settle(self) -> None:
        """Wait until the async pusher (run as the server's user) has released its lock."""
        lock = self.dir / "spool" / LOCK_FILE
        deadline = time.monotonic() + 60
        while lock.exists() and _locked(lock) and time.monotonic() < deadline:
            time.sleep(0.2)


def _locked(path: Path) -> bool:
    # drkit's Spool refuses a spool owned by another user (as it should): this script runs as
    # root while the pusher runs as the server's user, so it tests the lock file directly.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class PgBackRest:
    def __init__(self, root: Path, cluster: PgCluster) -> None:
        self.dir = make_rig_dir(root, "pgbackrest-")
        self.cluster = cluster
        self.repo = self.dir / "repo"
        self.config = self.dir / "pgbackrest.conf"
        self.cipher = secrets.token_hex(24)

    def prepare(self, *, async_: bool) -> Path:
        for sub in ("repo", "log", "lock", "spool"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
            (self.dir / sub).mkdir(mode=0o750)
            chown_to_server_user(self.dir / sub)
        template = self.dir / "repo-with-stanza"
        if template.exists():  # an empty repository that has the stanza
            self.repo.rmdir()
            subprocess.run(["cp", "-a", str(template), str(self.repo)], check=True)
        self.config.write_text(
            "[global]\n"
            f"repo1-path={self.repo}\n"
            "repo1-cipher-type=aes-256-cbc\n"
            f"repo1-cipher-pass={self.cipher}\n"
            "compress-type=zst\ncompress-level=3\n"
            f"process-max={PROCESS_MAX}\n"
            f"archive-async={'y' if async_ else 'n'}\n"
            f"log-path={self.dir / 'log'}\nlock-path={self.dir / 'lock'}\n"
            f"spool-path={self.dir / 'spool'}\n"
            "log-level-console=warn\nlog-level-file=off\n"
            "[bench]\n"
            f"pg1-path={self.cluster.pgdata}\n"
            f"pg1-socket-path={self.cluster.socket_dir}\n"
            f"pg1-port={self.cluster.port}\n"
        )
        self.config.chmod(0o640)
        chown_to_server_user(self.config)
        return self.repo

    def stanza_create(self) -> None:
        run_as_postgres(
            ["pgbackrest", f"--config={self.config}", "--stanza=bench", "stanza-create"],
            self.dir,
            check=True,
        )
        subprocess.run(["cp", "-a", str(self.repo), str(self.dir / "repo-with-stanza")], check=True)

    def command(self, name: str) -> list[str]:
        return [
            "pgbackrest",
            f"--config={self.config}",
            "--stanza=bench",
            "archive-push",
            f"pg_wal/{name}",
        ]

    def settle(self) -> None:
        time.sleep(2)  # the async process exits once the queue is empty


# -- playing PostgreSQL's archiver ----------------------------------------------------------------


def reset_status(pgdata: Path, names: list[str]) -> None:
    status = pgdata / "pg_wal" / "archive_status"
    for entry in status.iterdir():
        entry.unlink()
    for name in names:
        (status / f"{name}.ready").touch()
        chown_to_server_user(status / f"{name}.ready")
        (pgdata / "pg_wal" / name).read_bytes()  # warm page cache, as after PostgreSQL wrote it


def archive_all(
    pgdata: Path, names: list[str], command: Callable[[str], list[str]]
) -> tuple[float, list[float]]:
    status = pgdata / "pg_wal" / "archive_status"
    latencies = []
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        proc = run_as_postgres(command(name), pgdata)
        latencies.append(time.monotonic() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{command(name)} exited {proc.returncode}: {proc.stderr}")
        (status / f"{name}.ready").rename(status / f"{name}.done")
    return time.monotonic() - started, latencies


def import_time_ms(pgdata: Path, config: Path, name: str) -> float:
    python = str(DRKIT.parent / "python")
    cmd = [python, "-X", "importtime", str(DRKIT), "wal-push", "--config", str(config)]
    proc = run_as_postgres([*cmd, f"pg_wal/{name}"], pgdata)
    total = 0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            total += int(line.split(":", 1)[1].split("|")[0])
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if shutil.which("pgbackrest") is None:
        parser.error("pgbackrest not found (Debian: apt-get install pgbackrest)")

    root = make_rig_dir(Path("/tmp"), "drkit-bench-wal-")
    runs: list[Run] = []
    try:
        cluster, archive, names = make_segments(root, args.segments)
        first = (archive / names[0]).read_bytes()[:40]
        system_identifier = struct.unpack_from("<HHIQIxxxxQII", first)[5]
        pgbr = PgBackRest(root, cluster)
        pgbr.prepare(async_=False)
        pgbr.stanza_create()
        cluster.stop()
        wal_dir = cluster.pgdata / "pg_wal"
        for name in names:
            shutil.copy2(archive / name, wal_dir / name)
            chown_to_server_user(wal_dir / name)
        drkit = Drkit(root, cluster.pgdata, system_identifier)

        cases: list[tuple[str, str, Callable[[], Path], Drkit | PgBackRest]] = [
            ("drkit (zstd 1)", "sync", lambda: drkit.prepare(async_=False, level=1), drkit),
            ("drkit (zstd 3)", "sync", lambda: drkit.prepare(async_=False, level=3), drkit),
            ("pgBackRest 2.45 (zst 3)", "sync", lambda: pgbr.prepare(async_=False), pgbr),
            ("drkit (zstd 1)", "async", lambda: drkit.prepare(async_=True, level=1), drkit),
            ("drkit (zstd 3)", "async", lambda: drkit.prepare(async_=True, level=3), drkit),
            ("pgBackRest 2.45 (zst 3)", "async", lambda: pgbr.prepare(async_=True), pgbr),
        ]
        for tool, mode, prepare, runner in cases:
            best: Run | None = None
            for attempt in range(args.repeat):
                repo = prepare()
                reset_status(cluster.pgdata, names)
                if not wait_until_quiet(timeout=300):
                    print("  (the machine is busy with other work: numbers are noisy)")
                busy_before = machine_busy_seconds()
                wall, latencies = archive_all(cluster.pgdata, names, runner.command)
                busy = (machine_busy_seconds() - busy_before) / wall
                runner.settle()
                run = Run(tool, mode, len(names), wall, latencies, tree_bytes(repo), busy)
                print(f"{tool} {mode} #{attempt + 1}: {len(names) / wall:.1f} seg/s", flush=True)
                if best is None or run.wall_s < best.wall_s:
                    best = run
            assert best is not None
            runs.append(best)

        drkit.prepare(async_=False, level=1)
        reset_status(cluster.pgdata, names[:1])
        imports = import_time_ms(cluster.pgdata, drkit.config, names[0])
    finally:
        stop_clusters_under(root)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{len(names)} segments of pgbench WAL (16 MiB each), archived one process per segment:")
    print()
    header = ("tool", "mode", "seg/s", "MiB/s", "p50 ms", "p95 ms", "stored", "CPUs")
    widths = (24, 5, 7, 7, 7, 7, 6, 4)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for run in runs:
        print(run.row())
    by = {(r.tool, r.mode): r.segments / r.wall_s for r in runs}
    for mode in ("sync", "async"):
        ratio = by[("drkit (zstd 1)", mode)] / by[("pgBackRest 2.45 (zst 3)", mode)]
        print(f"drkit (zstd 1) / pgBackRest, {mode}: {ratio:.2f}x")
    print(f"wal-push import time (python -X importtime, sum of self times): {imports:.1f} ms")
    print("stored = stored bytes / WAL bytes; CPUs = machine CPU busy during the run / wall time")


if __name__ == "__main__":
    main()
