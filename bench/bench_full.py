"""Full backup and restore: drkit against pg_basebackup | zstd and pgBackRest, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages), pgbackrest and zstd:

    .venv/bin/python bench/bench_full.py --scale 50 [--profile stock|random|both] [--keep]

For each data profile it builds a pgbench database, then for each tool takes a full backup and
restores it into a new directory, starts the restored cluster and waits until it is promoted (no
longer in recovery). The page cache is dropped before every measured step. It prints a table per
profile with absolute numbers and the ratios drkit / pg_basebackup+zstd and drkit / pgBackRest, and
checks every restored cluster holds the source's data. See bench/README.md for what each number
means and docs/performance.md for results.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from common import (
    DRKIT,
    PG_VERSION,
    REPO_ROOT,
    TIME,
    Measurement,
    MiB,
    cached_mib,
    drop_page_cache,
    machine_busy_seconds,
    postgres_cpu_seconds,
    prepare_step,
    run_measured,
    scratch_dir,
    tree_size,
)
from rig.drkit import Drkit
from rig.postgres import (
    PgCluster,
    attach_cluster,
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
    make_template,
)

from drkit.config.settings import BackupSettings

ZSTD_LEVEL = 3
PROCESS_MAX = 2
TOOLS = ("drkit", "pg_basebackup+zstd", "pgBackRest")

# The source cluster: archiving on (pgBackRest needs it; archive_command is set once the stanza
# exists), room for the data load's WAL, the rig's defaults otherwise (tests/rig/postgres.py).
SOURCE_CONF = {
    "archive_mode": "on",
    "archive_command": "/bin/true",
    "shared_buffers": "128MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
}
# Restored copies must not archive into the benchmark's pgBackRest repository.
RESTORED_CONF = {"archive_mode": "off"}

# What the restored data must match: row counts, balances, and a hash of every filler value.
SUMMARY_SQL = """
SELECT (SELECT count(*) FROM pgbench_accounts) || ' accounts, sum(abalance) '
    || (SELECT sum(abalance) FROM pgbench_accounts) || ', filler hash '
    || (SELECT sum(hashtext(filler)::bigint) FROM pgbench_accounts) || ', '
    || (SELECT count(*) FROM pgbench_history) || ' history, '
    || (SELECT count(*) FROM pgbench_tellers) || ' tellers sum '
    || (SELECT sum(tbalance) FROM pgbench_tellers) || ', '
    || (SELECT count(*) FROM pgbench_branches) || ' branches sum '
    || (SELECT sum(bbalance) FROM pgbench_branches)
"""

# 84 random hex characters: 4 bits of entropy per byte, so the table compresses ~2.7x with zstd.
RANDOM_ACCOUNTS_SQL = """
INSERT INTO pgbench_branches (bid, bbalance) SELECT bid, 0 FROM generate_series(1, {scale}) bid;
INSERT INTO pgbench_tellers (tid, bid, tbalance)
  SELECT tid, (tid - 1) / 10 + 1, 0 FROM generate_series(1, {scale} * 10) tid;
INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
  SELECT aid, (aid - 1) / 100000 + 1, 0,
         substr(md5(random()::text) || md5(random()::text) || md5(random()::text), 1, 84)
  FROM generate_series(1, {scale} * 100000) aid;
"""


class Bench:
    """One run: a scratch root, the PostgreSQL template, and where logs go."""

    def __init__(self, root: Path, scale: int, version: int = PG_VERSION) -> None:
        self.root = root
        self.scale = scale
        self.version = version
        self.log = root / "bench.log"
        self.template = make_template(version, root)
        self.cache_drop_works = drop_page_cache()
        # drkit as installed from a wheel: its modules compiled to bytecode once (this checkout
        # is an editable install, and PYTHONDONTWRITEBYTECODE=1 here would otherwise have every
        # drkit command compile them from source again: 30-70 ms each)
        compileall.compile_dir(REPO_ROOT / "drkit", quiet=1)

    def prepare_step(self) -> None:
        """Before each measured step: wait for an idle machine, then drop the page cache."""
        prepare_step(drop_cache=self.cache_drop_works)


# -- the source database -------------------------------------------------------------------------


def build_source(bench: Bench, profile: str) -> PgCluster:
    """A started cluster holding a pgbench database in ``profile``, checkpointed."""
    cluster = clone_cluster(bench.template, bench.version, bench.root, SOURCE_CONF)
    cluster.start()
    scale = str(bench.scale)
    started = time.monotonic()
    if profile == "stock":
        cluster.run_bin("pgbench", "-i", "-q", "-s", scale, timeout=3600)
    else:
        cluster.run_bin("pgbench", "-i", "-q", "-s", scale, "-I", "dt")
        long_sql(cluster, RANDOM_ACCOUNTS_SQL.format(scale=bench.scale))
        cluster.run_bin("pgbench", "-i", "-q", "-s", scale, "-I", "vp", timeout=3600)
    # A little traffic, so balances and history are not all zero.
    cluster.run_bin("pgbench", "-n", "-c", "2", "-j", "2", "-t", "2500", timeout=3600)
    long_sql(cluster, "VACUUM ANALYZE")
    long_sql(cluster, "CHECKPOINT")
    print(f"  built {profile} database at scale {bench.scale} in {time.monotonic() - started:.0f}s")
    return cluster


def long_sql(cluster: PgCluster, sql: str) -> str:
    """``cluster.psql`` without its 5-minute limit, for statements that grow with the scale."""
    args = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    return cluster.run_bin("psql", *args, input=sql, timeout=6 * 3600).stdout.rstrip("\n")


def summary(cluster: PgCluster) -> str:
    return long_sql(cluster, SUMMARY_SQL)


# -- restoring and starting ----------------------------------------------------------------------


def empty_target(bench: Bench, name: str) -> PgCluster:
    """An empty PGDATA directory (0700, owned by postgres) wrapped in a stopped PgCluster."""
    pgdata = bench.root / name
    pgdata.mkdir(mode=0o700)
    return attach_cluster(pgdata, bench.version, bench.root)


def start_until_promoted(cluster: PgCluster) -> float:
    """Start a restored cluster and wait until it accepts connections and is out of recovery;
    returns the seconds that took."""
    started = time.monotonic()
    cluster.start(timeout=1800)
    while cluster.psql("SELECT pg_is_in_recovery()") != "f":
        time.sleep(0.05)
    return time.monotonic() - started


def measure_backup(
    bench: Bench, tool: str, source: PgCluster, cmd: list[str], stored: Path
) -> Measurement:
    """Run a backup command; ``stored`` is what it wrote (a repository, a file)."""
    bench.prepare_step()
    machine_before = machine_busy_seconds()
    server_before = postgres_cpu_seconds(source.pgdata)
    run = run_measured(cmd, log=bench.log, cwd=bench.root)
    return Measurement(
        tool=tool,
        step="backup",
        wall_s=run.wall_s,
        cpu_s=run.cpu_s,
        server_cpu_s=postgres_cpu_seconds(source.pgdata) - server_before,
        machine_cpu_s=machine_busy_seconds() - machine_before,
        max_rss_mib=run.max_rss_mib,
        tree_rss_mib=run.tree_rss_mib,
        size_bytes=tree_size(stored),
    )


def measure_restore(
    bench: Bench,
    tool: str,
    cmd: list[str],
    target: PgCluster,
    expected: str,
    describe: Callable[[PgCluster], str] | None = None,
) -> Measurement:
    """Run a restore command into ``target``, start it until promoted, check its data (what
    ``describe``, by default ``summary``, says of it must be ``expected``), remove it."""
    bench.prepare_step()
    machine_before = machine_busy_seconds()
    run = run_measured(cmd, log=bench.log, cwd=bench.root)
    target.set_conf(RESTORED_CONF)
    start_s = start_until_promoted(target)
    result = Measurement(
        tool=tool,
        step="restore",
        wall_s=run.wall_s + start_s,
        cpu_s=run.cpu_s,
        server_cpu_s=postgres_cpu_seconds(target.pgdata),  # a new server: all of it is recovery
        machine_cpu_s=machine_busy_seconds() - machine_before,
        max_rss_mib=run.max_rss_mib,
        tree_rss_mib=run.tree_rss_mib,
        detail={"restore_s": run.wall_s, "start_s": start_s},
    )
    got = (describe or summary)(target)
    result.verified = "ok" if got == expected else f"MISMATCH: {got!r} != {expected!r}"
    target.cleanup()
    shutil.rmtree(target.pgdata, ignore_errors=True)
    return result


# -- drkit ---------------------------------------------------------------------------------------


def bench_drkit(bench: Bench, source: PgCluster, expected: str) -> list[Measurement]:
    workdir = make_rig_dir(bench.root, "drkit-")
    dk = Drkit(
        source,
        workdir,
        # the shipped chunk size, not the test rig's small one
        backup={
            "process_max": PROCESS_MAX,
            "compress_level": ZSTD_LEVEL,
            "start_fast": True,
            "chunk_size": BackupSettings.model_fields["chunk_size"].default,
        },
    )
    dk.ok("init")
    config = ["--config", str(dk.config)]

    backup = measure_backup(
        bench, "drkit", source, [str(DRKIT), "backup", "--type", "full", *config], dk.repo_path
    )

    target = empty_target(bench, "drkit-restored")
    restore = measure_restore(
        bench,
        "drkit",
        [str(DRKIT), "restore", "--pgdata", str(target.pgdata), *config],
        target,
        expected,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return [backup, restore]


# -- pg_basebackup | zstd ------------------------------------------------------------------------


def bench_basebackup(bench: Bench, source: PgCluster, expected: str) -> list[Measurement]:
    # pg_basebackup refuses "-X stream" when the tar goes to stdout, so the WAL is fetched at the
    # end of the backup instead ("-X fetch"): the same segments, carried inside base.tar.
    archive = bench.root / "base.tar.zst"
    pg_basebackup = source.bindir / "pg_basebackup"
    backup_cmd = (
        "set -o pipefail; "
        f"{pg_basebackup} -h {source.socket_dir} -p {source.port} -U postgres"
        f" -Ft -X fetch -c fast -D - | zstd -{ZSTD_LEVEL} -T{PROCESS_MAX} -q -o {archive}"
        f" && sync {archive}"
    )
    backup = measure_backup(
        bench, "pg_basebackup+zstd", source, ["bash", "-c", backup_cmd], archive
    )

    target = empty_target(bench, "basebackup-restored")
    restore_cmd = (
        f"set -o pipefail; zstd -d -q -c {archive} | tar -x -f - -C {target.pgdata} && sync"
    )
    restore = measure_restore(
        bench, "pg_basebackup+zstd", ["bash", "-c", restore_cmd], target, expected
    )
    archive.unlink()
    return [backup, restore]


# -- pgBackRest ----------------------------------------------------------------------------------


class PgBackRest:
    """A stanza ``bench`` for the source cluster with a local, encrypted, zstd repository."""

    def __init__(self, bench: Bench, source: PgCluster) -> None:
        self.bench = bench
        self.dir = make_rig_dir(bench.root, "pgbackrest-")
        self.repo = self.dir / "repo"
        self.config = self.dir / "pgbackrest.conf"
        for sub in ("repo", "log", "lock", "spool"):
            (self.dir / sub).mkdir(mode=0o750)
            chown_to_server_user(self.dir / sub)
        self.config.write_text(
            "[global]\n"
            f"repo1-path={self.repo}\n"
            "repo1-retention-full=2\n"
            "repo1-cipher-type=aes-256-cbc\n"
            f"repo1-cipher-pass={secrets.token_hex(24)}\n"
            f"compress-type=zst\ncompress-level={ZSTD_LEVEL}\n"
            f"process-max={PROCESS_MAX}\n"
            "start-fast=y\n"
            f"log-path={self.dir / 'log'}\nlock-path={self.dir / 'lock'}\n"
            f"spool-path={self.dir / 'spool'}\n"
            "log-level-console=warn\n"
            "[bench]\n"
            f"pg1-path={source.pgdata}\n"
            f"pg1-socket-path={source.socket_dir}\n"
            f"pg1-port={source.port}\n"
        )
        self.config.chmod(0o640)
        chown_to_server_user(self.config)

    def command(self, *args: str) -> list[str]:
        """A pgbackrest command line, run as the postgres user."""
        return [
            "runuser",
            "-u",
            "postgres",
            "--",
            "pgbackrest",
            f"--config={self.config}",
            "--stanza=bench",
            *args,
        ]

    def setup(self, source: PgCluster) -> None:
        """Create the stanza, archive WAL into it, and check that archiving works."""
        run_measured(self.command("stanza-create"), log=self.bench.log, cwd=self.dir)
        push = f"pgbackrest --config={self.config} --stanza=bench archive-push %p"
        source.set_conf({"archive_command": push})
        source.reload()
        run_measured(self.command("check"), log=self.bench.log, cwd=self.dir)


def bench_pgbackrest(bench: Bench, source: PgCluster, expected: str) -> list[Measurement]:
    pgbr = PgBackRest(bench, source)
    pgbr.setup(source)
    backup = measure_backup(
        bench, "pgBackRest", source, pgbr.command("backup", "--type=full"), pgbr.repo
    )

    target = empty_target(bench, "pgbackrest-restored")
    # Recover only to consistency and promote, as the other two restores do.
    restore_cmd = pgbr.command(
        f"--pg1-path={target.pgdata}", "--type=immediate", "--target-action=promote", "restore"
    )
    restore = measure_restore(bench, "pgBackRest", restore_cmd, target, expected)
    # Later backups need no archive: stop archiving into the repository we are about to remove.
    source.set_conf({"archive_command": "/bin/true"})
    source.reload()
    shutil.rmtree(pgbr.dir, ignore_errors=True)
    return [backup, restore]


# -- report --------------------------------------------------------------------------------------


# (label, step, value) for each row of the table; every row gets the two drkit ratios.
ROWS = [
    ("backup wall (s)", "backup", lambda m: m.wall_s),
    ("backup CPU, tool (s)", "backup", lambda m: m.cpu_s),
    ("backup CPU, server (s)", "backup", lambda m: m.server_cpu_s),
    ("backup CPU, tool+server (s)", "backup", lambda m: m.cpu_s + m.server_cpu_s),
    ("backup CPU, whole machine (s)", "backup", lambda m: m.machine_cpu_s),
    ("backup peak RSS, largest process (MiB)", "backup", lambda m: m.max_rss_mib),
    ("backup peak RSS, process tree (MiB)", "backup", lambda m: m.tree_rss_mib),
    ("backup size (MiB)", "backup", lambda m: m.size_bytes / MiB),
    ("restore -> promoted wall (s)", "restore", lambda m: m.wall_s),
    ("  of which restore command (s)", "restore", lambda m: m.detail["restore_s"]),
    ("  of which start -> promoted (s)", "restore", lambda m: m.detail["start_s"]),
    ("restore CPU, tool (s)", "restore", lambda m: m.cpu_s),
    ("restore CPU, server recovery (s)", "restore", lambda m: m.server_cpu_s),
    ("restore CPU, whole machine (s)", "restore", lambda m: m.machine_cpu_s),
    ("restore peak RSS, largest process (MiB)", "restore", lambda m: m.max_rss_mib),
    ("restore peak RSS, process tree (MiB)", "restore", lambda m: m.tree_rss_mib),
]


def number(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_table(profile: str, scale: int, db_bytes: int, results: list[Measurement]) -> None:
    """A markdown table: one column per tool, then drkit / pg_basebackup and drkit / pgBackRest."""
    by = {(m.tool, m.step): m for m in results}
    lines = [["", *TOOLS, "drkit/pgbb", "drkit/pgbr"]]
    for label, step, value in ROWS:
        drkit, pgbb, pgbr = (value(by[(tool, step)]) for tool in TOOLS)
        lines.append(
            [
                label,
                number(drkit),
                number(pgbb),
                number(pgbr),
                ratio(drkit, pgbb),
                ratio(drkit, pgbr),
            ]
        )
    sizes = [by[(tool, "backup")].size_bytes for tool in TOOLS]
    lines.append(
        ["compression (database / backup)", *(f"{db_bytes / s:.2f}x" for s in sizes), "", ""]
    )
    lines.append(
        ["restored data equals source", *(by[(t, "restore")].verified for t in TOOLS), "", ""]
    )

    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    print(f"\nprofile {profile}, scale {scale}, databases {db_bytes / MiB:.0f} MiB")
    rule = ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    for n, row in enumerate(lines):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("| " + " | ".join(cells) + " |")
        if n == 0:
            print("|" + "|".join(rule) + "|")


def drkit_version() -> str:
    """drkit's version and the git commit benchmarked (with "+changes" for a dirty tree)."""
    version = subprocess.run([str(DRKIT), "--version"], capture_output=True, text=True).stdout
    git = ["git", "-C", str(REPO_ROOT)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "drkit"], capture_output=True, text=True
    ).stdout.strip()
    return f"{version.strip()} at {commit or '?'}{' +changes in drkit/' if dirty else ''}"


# -- main ----------------------------------------------------------------------------------------


def print_step(m: Measurement) -> None:
    print(
        f"    {m.step}: {m.wall_s:.2f}s wall, CPU {m.cpu_s:.2f}s tool"
        f" + {m.server_cpu_s:.2f}s server ({m.machine_cpu_s:.2f}s whole machine),"
        f" {m.max_rss_mib:.0f} MiB RSS"
        + (f", {m.size_bytes / MiB:.1f} MiB stored" if m.size_bytes else "")
        + (f", data {m.verified}" if m.verified else "")
        + (" NOISY: other work ran on the machine" if m.noisy else ""),
        flush=True,
    )


def run_profile(bench: Bench, profile: str, keep: bool, retries: int) -> dict[str, object]:
    print(f"profile {profile}:")
    source = build_source(bench, profile)
    expected = summary(source)
    db_bytes = int(source.psql("SELECT sum(pg_database_size(datname)) FROM pg_database"))
    print(f"  source data: {expected}")
    results: list[Measurement] = []
    for name, step in (
        ("drkit", bench_drkit),
        ("pg_basebackup+zstd", bench_basebackup),
        ("pgBackRest", bench_pgbackrest),
    ):
        print(f"  {name} ...", flush=True)
        for attempt in range(retries + 1):
            measured = step(bench, source, expected)
            for m in measured:
                print_step(m)
            if not any(m.noisy for m in measured) or attempt == retries:
                break
            print("    other work ran on the machine meanwhile: measuring again", flush=True)
        results += measured
    print_table(profile, bench.scale, db_bytes, results)
    noisy = [f"{m.tool} {m.step}" for m in results if m.noisy]
    if noisy:
        print(
            f"WARNING: other work used the CPUs during: {', '.join(noisy)}; rerun on an idle"
            " machine before trusting those numbers"
        )
    if not keep:
        source.cleanup()
    return {
        "profile": profile,
        "scale": bench.scale,
        "database_bytes": db_bytes,
        "results": [asdict(m) for m in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50)")
    parser.add_argument("--profile", choices=("stock", "random", "both"), default="both")
    parser.add_argument("--keep", action="store_true", help="keep clusters and files")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the scratch directory is made (default /var/tmp)",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this file")
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="measure a tool again when other work disturbed it (default 3)",
    )
    args = parser.parse_args()

    if os.geteuid() != 0:
        parser.error("run as root: it drops the page cache and runs PostgreSQL as 'postgres'")
    for tool in ("pgbackrest", "zstd", "runuser", TIME):
        if shutil.which(tool) is None:
            parser.error(f"'{tool}' not found (Debian: apt-get install pgbackrest zstd time)")

    # `kill` (SIGTERM) then unwinds like Ctrl-C: clusters are stopped and files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    with scratch_dir("drkit-bench-", args.workdir, keep=args.keep) as root:
        bench = Bench(root, args.scale)
        print(f"scratch directory {root}; {os.cpu_count()} CPUs; {drkit_version()}")
        if bench.cache_drop_works:
            print(
                f"page cache dropped before each measured step (Cached now {cached_mib():.0f} MiB)"
            )
        else:
            print("WARNING: cannot drop the page cache here; steps run with a warm cache")
        profiles = ["stock", "random"] if args.profile == "both" else [args.profile]
        report = []
        for profile in profiles:
            report.append(run_profile(bench, profile, args.keep, args.retries))
    if args.json:
        args.json.write_text(
            json.dumps({"cache_dropped": bench.cache_drop_works, "profiles": report}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
