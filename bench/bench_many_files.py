"""Restore of a cluster of many small relations: drkit against pgBackRest, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages), pgbackrest and zstd:

    .venv/bin/python bench/bench_many_files.py [--relations 100000] [--runs 2]

It builds a cluster holding ``--relations`` one-row tables (one 8 KiB heap file each, plus the
catalog that lists them), takes a full backup of it with each tool (as bench_full.py configures
them) and restores each backup ``--runs`` times into a new directory, timing the restore command
and the start of the restored cluster until it is promoted, and checking its data (the number of
tables and the sum of their rows). The page cache is dropped before every measured step. What
it measures is the cost per file: creating it, decoding a small frame, checking it, setting its
mode and mtime.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from bench_full import (
    DRKIT,
    PROCESS_MAX,
    SOURCE_CONF,
    ZSTD_LEVEL,
    Bench,
    PgBackRest,
    long_sql,
    measure_backup,
    measure_restore,
)
from common import TIME, Measurement, prepare_step, scratch_dir
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, clone_cluster, make_rig_dir

# Tables made per transaction: each holds a lock on its new relation until commit
BATCH = 2000

SUMMARY_SQL = """
SELECT count(*) || ' tables' FROM pg_class WHERE relname LIKE 'small\\_%' AND relkind = 'r'
"""


class QuietBench(Bench):
    """A Bench that waits ``quiet_timeout`` seconds at most for an idle machine."""

    def __init__(self, root: Path, quiet_timeout: float) -> None:
        super().__init__(root, scale=1)
        self.quiet_timeout = quiet_timeout

    def prepare_step(self) -> None:
        prepare_step(self.quiet_timeout, drop_cache=self.cache_drop_works)


def build_source(bench: Bench, relations: int) -> PgCluster:
    """A started cluster with ``relations`` one-row tables small_1 ... small_N, checkpointed."""
    conf = {**SOURCE_CONF, "max_locks_per_transaction": BATCH}
    cluster = clone_cluster(bench.template, bench.version, bench.root, conf)
    cluster.start()
    started = time.monotonic()
    for low in range(1, relations + 1, BATCH):
        high = min(low + BATCH - 1, relations)
        long_sql(
            cluster,
            f"DO $$ BEGIN FOR i IN {low}..{high} LOOP"
            " EXECUTE format('CREATE TABLE small_%s AS SELECT %s AS n', i, i);"
            " END LOOP; END $$",
        )
    long_sql(cluster, "CHECKPOINT")
    print(f"  built {relations} tables in {time.monotonic() - started:.0f}s", flush=True)
    return cluster


def summary(cluster: PgCluster) -> str:
    return long_sql(cluster, SUMMARY_SQL)


def print_step(m: Measurement) -> None:
    detail = ", ".join(f"{k} {v:.2f}" for k, v in m.detail.items())
    print(
        f"    {m.tool} {m.step}: wall {m.wall_s:.2f}s, CPU {m.cpu_s:.2f}s"
        + (f" ({detail})" if detail else "")
        + (f", data {m.verified}" if m.verified else "")
        + (" NOISY: other work ran on the machine" if m.noisy else ""),
        flush=True,
    )


def empty_target(bench: Bench, name: str) -> PgCluster:
    pgdata = bench.root / name
    pgdata.mkdir(mode=0o700)
    return attach_cluster(pgdata, bench.version, bench.root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relations", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=2, help="restores of each backup")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=600,
        help="seconds to wait for an idle machine before each step (default 600)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it drops the page cache and runs PostgreSQL as 'postgres'")
    for tool in ("pgbackrest", "runuser", TIME):
        if shutil.which(tool) is None:
            parser.error(f"'{tool}' not found (Debian: apt-get install pgbackrest time)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    with scratch_dir("drkit-bench-", args.workdir) as root:
        bench = QuietBench(root, args.quiet_timeout)
        source = build_source(bench, args.relations)
        expected = summary(source)
        print(f"  source: {expected}; {os.cpu_count()} CPUs", flush=True)

        workdir = make_rig_dir(root, "drkit-")
        dk = Drkit(
            source,
            workdir,
            backup={"process_max": PROCESS_MAX, "compress_level": ZSTD_LEVEL, "start_fast": True},
        )
        dk.ok("init")
        config = ["--config", str(dk.config)]
        print_step(
            measure_backup(
                bench,
                "drkit",
                source,
                [str(DRKIT), "backup", "--type", "full", *config],
                dk.repo_path,
            )
        )
        pgbr = PgBackRest(bench, source)
        pgbr.setup(source)
        print_step(
            measure_backup(
                bench, "pgBackRest", source, pgbr.command("backup", "--type=full"), pgbr.repo
            )
        )
        source.set_conf({"archive_command": "/bin/true"})
        source.reload()

        for run in range(args.runs):
            target = empty_target(bench, f"drkit-restored-{run}")
            command = [str(DRKIT), "restore", "--pgdata", str(target.pgdata), *config]
            print_step(measure_restore(bench, "drkit", command, target, expected, summary))
            target = empty_target(bench, f"pgbackrest-restored-{run}")
            command = pgbr.command(
                f"--pg1-path={target.pgdata}",
                "--type=immediate",
                "--target-action=promote",
                "restore",
            )
            print_step(measure_restore(bench, "pgBackRest", command, target, expected, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
