"""PITR: restore, then replay >= 1 GiB of archived WAL to promotion, drkit against pgBackRest and
against the same WAL already in ``pg_wal``, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages), pgbackrest and GNU time:

    .venv/bin/python bench/bench_pitr.py [--wal-gib 1.0] [--runs 1] [--keep]

1. One source cluster archives every WAL segment three times, in one ``archive_command``: a plain
   ``cp`` into a directory, ``drkit wal-push`` (synchronous) and ``pgbackrest archive-push``.
   Each tool takes a full backup; then a bulk insert writes ``--wal-gib`` GiB of WAL, all archived.
2. For each configuration, ``--runs`` times, alternating, with the page cache dropped before:
   restore the tool's backup into a new directory, start the server and wait until it replayed the
   whole archive and is promoted.
   - ``drkit``: ``drkit restore --target-latest``; its ``restore_command`` is ``drkit wal-fetch
     --prefetch`` with the default ``[archive] fetch_ahead`` and ``process_max``;
   - ``pgBackRest sync``: ``pgbackrest restore``, ``archive-get`` one segment per call;
   - ``pgBackRest async``: the same with ``archive-async=y`` (its default queue of 128 MiB, i.e. 8
     segments, fetched ahead by ``process-max`` = 2 into its spool);
   - ``local pg_wal``: drkit's restore, with every archived segment copied into ``pg_wal`` (not
     timed, left in the page cache) and ``restore_command = 'false'``: archive recovery needs
     one, and a failing one makes PostgreSQL read ``pg_wal``. This is the limit: replay with
     fetching fully hidden.
3. Prints per configuration the wall of the restore command, of start -> promoted (the replay), the
   sum, the CPU of the restore command and of the server (which includes the restore_command calls
   it waited for, not detached fetchers), the busy CPU of the whole machine during the replay, and
   the ratios drkit / pgBackRest async, drkit / pgBackRest sync and drkit / local pg_wal. Every
   promoted cluster must hold the source's rows.
"""

from __future__ import annotations

import argparse
import compileall
import os
import secrets
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench_full import RESTORED_CONF, SOURCE_CONF
from common import (
    DRKIT,
    PG_VERSION,
    REPO_ROOT,
    TIME,
    drop_page_cache,
    machine_busy_seconds,
    postgres_cpu_seconds,
    run_measured,
    scratch_dir,
    wait_until_quiet,
)
from rig.archive import drkit_command, grant_to_server_user, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import (
    PgCluster,
    attach_cluster,
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
    make_template,
)

GiB = 1024**3
SEGMENT = 16 * 1024 * 1024
PROCESS_MAX = 2
CONFIGS = ("drkit", "pgBackRest async", "pgBackRest sync", "local pg_wal")
EXTRA_CONFIGS = ("drkit without quick path",)  # --configs: the full wal-fetch for every segment
BULK_ROWS = 500_000  # ~60 MiB of WAL per INSERT


@dataclass
class Run:
    config: str
    restore_s: float  # the restore command
    replay_s: float  # start -> promoted
    tool_cpu_s: float  # user + sys of the restore command
    server_cpu_s: float  # the restored server, with the restore_command calls it waited for
    machine_cpu_s: float  # busy CPU of the whole machine during start -> promoted
    restored_files: int  # "restored log file" lines in the server log

    @property
    def total_s(self) -> float:
        return self.restore_s + self.replay_s


class Source:
    """The source cluster, archiving into a directory, a drkit repository and a pgBackRest one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "bench.log"
        self.cluster = clone_cluster(make_template(PG_VERSION, root), PG_VERSION, root, SOURCE_CONF)
        self.cluster.start()
        self.segments = make_rig_dir(root, "segments-")
        self.dk = Drkit(
            self.cluster,
            make_rig_dir(root, "drkit-"),
            backup={"process_max": PROCESS_MAX, "compress_level": 3},
        )
        self.dk.ok("init")
        spool = self.dk.workdir / "spool"
        self.dk.write_config(archive={"spool_path": spool, "process_max": PROCESS_MAX})
        grant_to_server_user(self.dk)
        self.pgbr = PgBackRest(root, self.cluster)
        self.pgbr.stanza_create(self.log)
        push = " && ".join(
            (
                f"cp %p {self.segments}/%f",
                drkit_command(self.dk, "wal-push", "%p"),
                f"pgbackrest --config={self.pgbr.config(False)} --stanza=bench archive-push %p",
            )
        )
        self.cluster.set_conf({"archive_command": push})
        self.cluster.reload()
        self.cluster.psql("CREATE TABLE bulk (id bigint, v text)")

    def backups(self) -> None:
        print("full backups (drkit, pgBackRest) ...", flush=True)
        self.dk.ok("backup", "--type", "full")
        run_measured(self.pgbr.command(False, "backup", "--type=full"), log=self.log)
        # the drkit backup ran as root: the server user's wal-fetch reads the repository
        chown_to_server_user(self.dk.repo_path, recursive=True)

    def bulk_insert(self, wal_bytes: int) -> int:
        """Insert until ``wal_bytes`` of WAL were written and archived; the rows inserted."""
        lsn = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
        start = int(self.cluster.psql(lsn))
        print(f"bulk insert: {wal_bytes / GiB:.2f} GiB of WAL ...", flush=True)
        began, batch = time.monotonic(), 0
        while int(self.cluster.psql(lsn)) - start < wal_bytes:
            self.cluster.psql(
                f"INSERT INTO bulk SELECT g, md5(g::text) || md5((g + {batch})::text)"
                f" FROM generate_series(1, {BULK_ROWS}) g"
            )
            batch += 1
        wait_archived(self.cluster, switch_wal(self.cluster), timeout=3600)
        written = (int(self.cluster.psql(lsn)) - start) / GiB
        print(f"  {written:.2f} GiB of WAL in {time.monotonic() - began:.0f}s", flush=True)
        return int(self.cluster.psql("SELECT count(*) FROM bulk"))


class PgBackRest:
    """A stanza ``bench`` with a local, encrypted, zstd repository; one configuration file with
    ``archive-async=n`` and one with ``=y`` (what the restored cluster's archive-get reads)."""

    def __init__(self, root: Path, cluster: PgCluster) -> None:
        self.dir = make_rig_dir(root, "pgbackrest-")
        self.cluster = cluster
        for sub in ("repo", "log", "lock", "spool"):
            (self.dir / sub).mkdir(mode=0o750)
            chown_to_server_user(self.dir / sub)
        cipher = secrets.token_hex(24)
        for async_ in (False, True):
            path = self.config(async_)
            path.write_text(
                "[global]\n"
                f"repo1-path={self.dir / 'repo'}\n"
                "repo1-cipher-type=aes-256-cbc\n"
                f"repo1-cipher-pass={cipher}\n"
                "compress-type=zst\ncompress-level=3\n"
                f"process-max={PROCESS_MAX}\n"
                "start-fast=y\nrepo1-retention-full=2\n"
                f"archive-async={'y' if async_ else 'n'}\n"
                f"log-path={self.dir / 'log'}\nlock-path={self.dir / 'lock'}\n"
                f"spool-path={self.dir / 'spool'}\n"
                "log-level-console=warn\nlog-level-file=off\n"
                "[bench]\n"
                f"pg1-path={cluster.pgdata}\n"
                f"pg1-socket-path={cluster.socket_dir}\n"
                f"pg1-port={cluster.port}\n"
            )
            path.chmod(0o640)
            chown_to_server_user(path)

    def config(self, async_: bool) -> Path:
        return self.dir / f"pgbackrest{'-async' if async_ else ''}.conf"

    def command(self, async_: bool, *args: str) -> list[str]:
        """A pgbackrest command line, run as the postgres user."""
        conf = f"--config={self.config(async_)}"
        return ["runuser", "-u", "postgres", "--", "pgbackrest", conf, "--stanza=bench", *args]

    def stanza_create(self, log: Path) -> None:
        run_measured(self.command(False, "stanza-create"), log=log)

    def clear_spool(self) -> None:
        """No segment an earlier run fetched ahead is served to the next."""
        spool = self.dir / "spool"
        shutil.rmtree(spool)
        spool.mkdir(mode=0o750)
        chown_to_server_user(spool)


# -- one configuration -------------------------------------------------------------------------


def restore(source: Source, config: str, pgdata: Path) -> tuple[float, float]:
    """Restore ``config``'s backup into ``pgdata``, ready to start; (wall, CPU) of the command."""
    dk, pgbr = source.dk, source.pgbr
    pgdata.mkdir(mode=0o700)
    chown_to_server_user(pgdata)  # drkit restores into it as root, for the server's user
    if config.startswith("pgBackRest"):
        async_ = config.endswith("async")
        pgbr.clear_spool()
        get = f"pgbackrest --config={pgbr.config(async_)} --stanza=bench --pg1-path={pgdata}"
        get += ' archive-get %f "%p"'
        cmd = pgbr.command(
            async_, f"--pg1-path={pgdata}", f"--recovery-option=restore_command={get}", "restore"
        )
    else:
        cmd = [str(DRKIT), "restore", "--pgdata", str(pgdata), "--target-latest"]
        cmd += ["--config", str(dk.config)]
    run = run_measured(cmd, log=source.log)
    if config == "local pg_wal":
        set_restore_command(pgdata, "false")
        for segment in sorted(source.segments.iterdir()):
            shutil.copyfile(segment, pgdata / "pg_wal" / segment.name)
    elif config == "drkit without quick path":
        set_restore_command(pgdata, None)
    return run.wall_s, run.cpu_s


def set_restore_command(pgdata: Path, command: str | None) -> None:
    """Replace the restore_command drkit restore wrote with ``command``; None: with the full
    ``drkit wal-fetch --prefetch`` it falls back to (its quick path left out)."""
    auto = pgdata / "postgresql.auto.conf"
    lines = auto.read_text().splitlines()
    (written,) = [line for line in lines if line.startswith("restore_command")]
    if command is None:
        command = written.split(" -- ", 1)[1].rstrip("'")
    lines = [line for line in lines if line != written]
    auto.write_text("\n".join([*lines, f"restore_command = '{command}'"]) + "\n")


def measure(source: Source, config: str, rows: int, number: int, quiet_wait: float) -> Run:
    pgdata = source.root / f"restored-{number}"
    if not wait_until_quiet(timeout=quiet_wait):
        print("    (the machine stayed busy: the numbers below are noisy)", flush=True)
    drop_page_cache()
    restore_s, tool_cpu = restore(source, config, pgdata)
    if config == "local pg_wal":
        os.sync()  # written out, still in the page cache: nothing left to fetch or read
    cluster = attach_cluster(pgdata, PG_VERSION, source.root, RESTORED_CONF)
    machine_before = machine_busy_seconds()
    began = time.monotonic()
    cluster.start(timeout=3600)
    cluster.wait_promoted(timeout=3600)
    replay_s = time.monotonic() - began
    run = Run(
        config,
        restore_s,
        replay_s,
        tool_cpu,
        postgres_cpu_seconds(pgdata),
        machine_busy_seconds() - machine_before,
        cluster.log_file.read_text().count("restored log file"),
    )
    got = int(cluster.psql("SELECT count(*) FROM bulk"))
    if got != rows:
        raise SystemExit(f"{config}: {got} rows after promotion, the source has {rows}")
    shutil.copyfile(
        cluster.log_file, source.root / f"server-{number}-{config.replace(' ', '-')}.log"
    )
    cluster.cleanup()
    shutil.rmtree(pgdata)
    return run


# -- report --------------------------------------------------------------------------------------


def report(runs: list[Run], wal_gib: float, segments: int) -> None:
    by: dict[str, list[Run]] = {}
    for run in runs:
        by.setdefault(run.config, []).append(run)

    def med(config: str, value: str) -> float:
        return statistics.median(getattr(r, value) for r in by[config])

    runs_each = len(runs) // len(by)
    print(f"\n{wal_gib:.2f} GiB of WAL, {segments} archived segments; medians of {runs_each}")
    print("run(s) per configuration (range in brackets)\n")
    print(
        "| configuration | restore s | start -> promoted s | total s | restore CPU s"
        " | server CPU s | machine CPU s (replay) | files restored |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for config, rs in by.items():
        walls = [r.replay_s for r in rs]
        print(
            f"| {config} | {med(config, 'restore_s'):.2f} | {med(config, 'replay_s'):.2f}"
            f" ({min(walls):.2f}-{max(walls):.2f}) | {med(config, 'total_s'):.2f}"
            f" | {med(config, 'tool_cpu_s'):.2f} | {med(config, 'server_cpu_s'):.2f}"
            f" | {med(config, 'machine_cpu_s'):.2f} | {rs[0].restored_files} |"
        )
    print()
    for other in [c for c in by if c != "drkit"]:
        total = med("drkit", "total_s") / med(other, "total_s")
        replay = med("drkit", "replay_s") / med(other, "replay_s")
        print(f"drkit / {other}: total {total:.2f}x, start -> promoted {replay:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wal-gib", type=float, default=1.0, help="WAL to replay (default 1)")
    parser.add_argument("--runs", type=int, default=1, help="runs per configuration")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS + EXTRA_CONFIGS)} (default: the first 4)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="seconds to wait for an idle machine"
    )
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",")]
    if "drkit" not in configs or not set(configs) <= set(CONFIGS + EXTRA_CONFIGS):
        parser.error(f"--configs: drkit and any of {', '.join(CONFIGS[1:] + EXTRA_CONFIGS)}")
    for tool in ("pgbackrest", "runuser", TIME):
        if shutil.which(tool) is None:
            parser.error(f"'{tool}' not found (Debian: apt-get install pgbackrest time)")
    # drkit as a wheel installs it: bytecode compiled once, not by every wal-fetch
    compileall.compile_dir(REPO_ROOT / "drkit", quiet=1)
    with scratch_dir("drkit-bench-pitr-", args.workdir, keep=args.keep) as root:
        source = Source(root)
        source.backups()
        rows = source.bulk_insert(int(args.wal_gib * GiB))
        source.cluster.stop()
        segments = sum(1 for p in source.segments.iterdir() if len(p.name) == 24)
        runs = []
        for i in range(args.runs):
            for config in configs:
                runs.append(measure(source, config, rows, len(runs), args.quiet_wait))
                r = runs[-1]
                print(
                    f"  {config} #{i + 1}: restore {r.restore_s:.2f} s, start -> promoted"
                    f" {r.replay_s:.2f} s, {r.restored_files} files restored",
                    flush=True,
                )
        report(runs, args.wal_gib, segments)


if __name__ == "__main__":
    main()
