"""Remote full backup against the local engine and pg_basebackup | zstd, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages) and zstd:

    .venv/bin/python bench/bench_remote.py --scale 50 [--runs 3] [--profile stock|random]

It builds a pgbench database listening on 127.0.0.1, then, ``--runs`` times and alternating,
takes a full backup three ways, each into an empty repository or file: drkit in local mode
(reading PGDATA), drkit in remote mode (BASE_BACKUP over TCP) and ``pg_basebackup -Ft -X fetch
-D - | zstd`` over TCP. The page cache is dropped before each (not with ``--keep-page-cache``,
which shows what the server's reads cost without the VM artefact docs/performance.md describes
under "The machine"). It prints each run's wall, CPU (the tool's own, and the server's) and size,
and the medians' ratios remote / local (goal: at most 1.2) and remote / pg_basebackup+zstd.

With ``--incr`` it measures instead a remote incremental after a 1% change on PostgreSQL 18 (the
server's incremental base backup from its WAL summaries), ``--runs`` times: pgbench_accounts
compacted (VACUUM FULL), a remote full, then bench_incr.py's 1% change (a contiguous 1% of the
accounts updated, 1% more appended, a checkpoint), then a remote incr. The change and the
compaction are those of the local engine's incr benchmark (bench_incr.py (a)), so the two are
comparable: without the compaction the earlier pgbench traffic leaves a free slot in thousands of
pages, where the updated rows' new versions land, and the "1%" change touches 7-8% of the pages
(``--as-built`` measures that).
It prints the incr's wall and stored bytes as fractions of the full's (goals: at most 0.30 and
0.05), and what the incr's bytes are: its WAL (pg_wal/), the relation files it stored as
changed blocks, and the files it stored whole. ``--pg-version 15``: the same on PostgreSQL 15,
whose remote incr reads the data directory over SQL (the blocks the WAL names).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from bench_full import (
    DRKIT,
    PROCESS_MAX,
    ZSTD_LEVEL,
    Bench,
    build_source,
    long_sql,
    measure_backup,
)
from bench_incr import change_one_percent
from common import Measurement, drop_page_cache, scratch_dir
from rig.drkit import Drkit
from rig.postgres import PgCluster, make_rig_dir


def backup_three_ways(bench: Bench, source: PgCluster, run: int) -> list[Measurement]:
    results = []
    for mode in ("local", "remote"):
        workdir = make_rig_dir(bench.root, f"{mode}-{run}-")
        settings = {"process_max": PROCESS_MAX, "compress_level": ZSTD_LEVEL, "start_fast": True}
        # drkit's default chunk size (the test rig sets 4 MiB)
        dk = Drkit(source, workdir, backup={**settings, "chunk_size": 16 * 1024 * 1024})
        if mode == "remote":
            postgres = {"mode": "remote", "host": "127.0.0.1", "port": source.port}
            dk.write_config(postgres={**postgres, "user": "postgres"})
        dk.ok("init")
        cmd = [str(DRKIT), "backup", "--config", str(dk.config)]
        results.append(measure_backup(bench, f"drkit {mode}", source, cmd, dk.repo_path))
        shutil.rmtree(workdir)
    archive = bench.root / "base.tar.zst"
    pg_basebackup = source.bindir / "pg_basebackup"
    cmd = (
        "set -o pipefail; "
        f"{pg_basebackup} -h 127.0.0.1 -p {source.port} -U postgres -Ft -X fetch -c fast"
        f" -D - | zstd -{ZSTD_LEVEL} -T{PROCESS_MAX} -q -o {archive} && sync {archive}"
    )
    results.append(
        measure_backup(bench, "pg_basebackup+zstd", source, ["bash", "-c", cmd], archive)
    )
    archive.unlink()
    return results


def remote_incr(
    bench: Bench, source: PgCluster, run: int, compact: bool
) -> tuple[Measurement, Measurement]:
    """A remote full, bench_incr's 1% change, a remote incr; the incr's size is what it added to
    the repository."""
    workdir = make_rig_dir(bench.root, f"incr-{run}-")
    settings = {"process_max": PROCESS_MAX, "compress_level": ZSTD_LEVEL, "start_fast": True}
    dk = Drkit(source, workdir, backup={**settings, "chunk_size": 16 * 1024 * 1024})
    postgres = {"mode": "remote", "host": "127.0.0.1", "port": source.port, "user": "postgres"}
    dk.write_config(postgres=postgres)
    dk.ok("init")
    if compact:  # as bench_incr (a): new row versions are appended, not scattered in free slots
        long_sql(source, "VACUUM FULL pgbench_accounts; CHECKPOINT")
    cmd = [str(DRKIT), "backup", "--config", str(dk.config)]
    full = measure_backup(
        bench, "drkit remote full", source, [*cmd, "--type", "full"], dk.repo_path
    )
    # a contiguous 1% of the accounts (a different one each run), 1% more appended
    change_one_percent(bench, source, first_aid=1 + run * bench.scale * 1000)
    incr = measure_backup(
        bench, "drkit remote incr", source, [*cmd, "--type", "incr"], dk.repo_path
    )
    incr.size_bytes -= full.size_bytes
    print(f"    incr's bytes: {incr_breakdown(dk)}")
    shutil.rmtree(workdir)
    return full, incr


def incr_breakdown(dk: Drkit) -> str:
    """What the newest backup stored itself: its WAL, relation files as changed blocks, files
    stored whole (MiB, as stored: compressed and encrypted)."""
    from drkit.config.settings import load_settings
    from drkit.repo.label import BackupLabel
    from drkit.repo.open import open_repository

    repo = open_repository(load_settings(dk.config))
    label = dk.info()["backups"][-1]["label"]
    files = [f for f in repo.load_manifest(BackupLabel(label))[0].files if f.backup is None]
    wal = [f for f in files if f.path.startswith("pg_wal/")]
    deltas = [f for f in files if f.pages is not None]
    whole = [f for f in files if f.pages is None and not f.path.startswith("pg_wal/")]
    pages = sum(end - start for f in deltas for start, end in f.pages or [])
    largest = sorted(whole, key=lambda f: f.length, reverse=True)[:3]

    def mib(entries: list) -> str:  # type: ignore[type-arg]
        return f"{sum(f.length for f in entries) / 2**20:.2f} MiB"

    return (
        f"WAL {mib(wal)} ({len(wal)} segments); changed blocks {mib(deltas)}"
        f" ({pages} pages in {len(deltas)} files); whole files {mib(whole)} ({len(whole)} files;"
        f" largest {', '.join(f'{f.path} {f.length / 1024:.0f} KiB' for f in largest)})"
    )


def main_incr(args: argparse.Namespace, root: Path) -> None:
    bench = Bench(root, args.scale, version=args.pg_version)
    if args.no_quiet_wait:
        bench.prepare_step = lambda: drop_page_cache() and None  # type: ignore[method-assign]
    source = build_source(bench, args.profile)
    source.set_conf({"listen_addresses": "127.0.0.1"})
    source.restart()
    walls, sizes = [], []
    print(f"{'run':>3} {'tool':<20} {'wall s':>8} {'cpu s':>7} {'server cpu s':>12} {'MiB':>8}")
    for run in range(args.runs):
        full, incr = remote_incr(bench, source, run, compact=not args.as_built)
        for m in (full, incr):
            print(
                f"{run:>3} {m.tool:<20} {m.wall_s:>8.2f} {m.cpu_s:>7.2f}"
                f" {m.server_cpu_s:>12.2f} {m.size_bytes / 2**20:>8.1f}"
            )
        walls.append(incr.wall_s / full.wall_s)
        sizes.append(incr.size_bytes / full.size_bytes)
    print(f"median: incr wall / full wall = {statistics.median(walls):.2f} (goal <= 0.30)")
    print(f"median: incr bytes / full bytes = {statistics.median(sizes):.3f} (goal <= 0.05)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", choices=["stock", "random"], default="random")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--incr", action="store_true", help="a remote incr after a 1%% change instead"
    )
    parser.add_argument("--pg-version", type=int, default=18, help="with --incr (default 18)")
    parser.add_argument(
        "--as-built",
        action="store_true",
        help="with --incr: no VACUUM FULL before the full (the 1%% change then touches ~8%% of"
        " the pages)",
    )
    parser.add_argument(
        "--keep-page-cache",
        action="store_true",
        help="full backups only: no page cache drop before each step, so the server reads the"
        " files from its page cache, not through memory the VM's host took back after a drop"
        " (docs/performance.md, 'The machine'); the local engine reads with O_DIRECT either way",
    )
    parser.add_argument(
        "--no-quiet-wait",
        action="store_true",
        help="do not wait for an idle machine before each step (a shared, loaded machine)",
    )
    args = parser.parse_args()
    with scratch_dir("drkit-bench-remote-", args.workdir) as root:
        if args.incr:
            main_incr(args, root)
            return 0
        bench = Bench(root, args.scale)
        if args.no_quiet_wait:
            bench.prepare_step = lambda: drop_page_cache() and None  # type: ignore[method-assign]
        if args.keep_page_cache:
            bench.cache_drop_works = False
            if args.no_quiet_wait:
                bench.prepare_step = lambda: None  # type: ignore[method-assign]
        source = build_source(bench, args.profile)
        source.set_conf({"listen_addresses": "127.0.0.1"})
        source.restart()
        walls: dict[str, list[float]] = {}
        cpus: dict[str, list[float]] = {}  # the tool's and the server's
        print(f"{'run':>3} {'tool':<20} {'wall s':>8} {'cpu s':>7} {'server cpu s':>12} {'MiB':>8}")
        for run in range(args.runs):
            for m in backup_three_ways(bench, source, run):
                walls.setdefault(m.tool, []).append(m.wall_s)
                cpus.setdefault(m.tool, []).append(m.cpu_s + m.server_cpu_s)
                size = m.size_bytes / 2**20
                print(
                    f"{run:>3} {m.tool:<20} {m.wall_s:>8.2f} {m.cpu_s:>7.2f}"
                    f" {m.server_cpu_s:>12.2f} {size:>8.1f}"
                )
        for what, values in (("wall", walls), ("CPU tool+server", cpus)):
            median = {tool: statistics.median(v) for tool, v in values.items()}
            remote, local = median["drkit remote"], median["drkit local"]
            goal = " (goal <= 1.2)" if what == "wall" else ""
            print(f"median {what}: remote / local = {remote / local:.2f}{goal}")
            baseline = median["pg_basebackup+zstd"]
            print(f"median {what}: remote / pg_basebackup+zstd = {remote / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
