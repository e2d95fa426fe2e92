"""Copies: the cost of fanning a backup out to S3, and of a `drkit replicate` with nothing to do.

Run as root (see bench/README.md for what is needed):

    .venv/bin/python bench/bench_copies.py --scale 50 [--backups 100] [--keep]

(a) On a pgbench database (random-filler profile, bench_full.build_source) a full backup with only
    the local repository, then one with the local repository and an S3 repository (moto on
    loopback, started here); the added wall time as a percentage (target: <= 50%).
    The two are measured alternately ``--repeat`` times; the medians are compared.
(b) On a tiny cluster, ``--backups`` small full backups fanned out to local + S3 (taken in-process
    for speed), then ``drkit replicate`` (a fresh process, as an operator runs it) timed with
    nothing left to copy (target: < 2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench_full import (
    DRKIT,
    PG_VERSION,
    PROCESS_MAX,
    SOURCE_CONF,
    ZSTD_LEVEL,
    Bench,
    build_source,
    drkit_version,
    measure_backup,
)
from common import MiB, cached_mib, run_measured, tree_size
from rig.drkit import Drkit
from rig.postgres import PgCluster, clone_cluster, make_rig_dir, stop_clusters_under
from rig.servers import MotoS3Server

BACKUP = {"process_max": PROCESS_MAX, "compress_level": ZSTD_LEVEL, "start_fast": True}


def s3_repo(server: MotoS3Server) -> dict[str, object]:
    """A fresh bucket on the moto server, as a drkit [[repo]] entry."""
    bucket = f"drkit-bench-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    return {
        "name": "s3",
        "type": "s3",
        "bucket": bucket,
        "prefix": "bench",
        "endpoint_url": server.direct_endpoint_url,
        "region": server.region,
        "offsite": True,
    }


def drkit_for(bench: Bench, source: PgCluster, extra: list[dict[str, object]]) -> Drkit:
    dk = Drkit(source, make_rig_dir(bench.root, "drkit-"), backup=BACKUP, extra_repos=extra)
    dk.write_config(retention={"full": 1000})  # nothing pruned during the benchmark
    dk.ok("init")
    return dk


# -- (a) fan-out ---------------------------------------------------------------------------------


def fan_out(bench: Bench, server: MotoS3Server, repeat: int) -> dict[str, object]:
    source = build_source(bench, "random")
    db_bytes = int(source.psql("SELECT sum(pg_database_size(datname)) FROM pg_database"))
    local_only = drkit_for(bench, source, [])
    both = drkit_for(bench, source, [s3_repo(server)])
    walls: dict[str, list[float]] = {"local": [], "local+s3": []}
    stored = 0
    for n in range(repeat):
        for name, dk in (("local", local_only), ("local+s3", both)):
            cmd = [str(DRKIT), "backup", "--type", "full", "--config", str(dk.config)]
            m = measure_backup(bench, name, source, cmd, dk.repo_path)
            walls[name].append(m.wall_s)
            stored = max(stored, m.size_bytes // (n + 1))
            print(
                f"  {name} full backup #{n + 1}: {m.wall_s:.2f}s wall, CPU {m.cpu_s:.2f}s drkit"
                f" + {m.server_cpu_s:.2f}s PostgreSQL, {m.machine_cpu_s:.2f}s whole machine"
                " (moto's share is in the last)",
                flush=True,
            )
        check = both.info()["backups"][-1]["copies"]["repos"]
        assert check == ["local", "s3"], check
    source.cleanup()
    local, fanned = statistics.median(walls["local"]), statistics.median(walls["local+s3"])
    return {
        "database_mib": db_bytes / MiB,
        "backup_mib": stored / MiB,
        "walls": walls,
        "local_s": local,
        "local_s3_s": fanned,
        "added_pct": 100 * (fanned - local) / local,
    }


# -- (b) replicate with nothing to do ------------------------------------------------------------


def many_backups(bench: Bench, server: MotoS3Server, count: int, runs: int) -> dict[str, object]:
    tiny = clone_cluster(bench.template, PG_VERSION, bench.root, SOURCE_CONF)
    tiny.start()
    tiny.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    dk = drkit_for(bench, tiny, [s3_repo(server)])
    started = time.monotonic()
    for n in range(count):
        dk.ok("backup", "--type", "full")
        if (n + 1) % 20 == 0:
            print(f"  {n + 1} backups in {time.monotonic() - started:.0f}s", flush=True)
    first = json.loads(dk.ok("replicate", "--json").stdout)  # should find nothing to copy
    info = dk.info()
    on_both = sum(1 for b in info["backups"] if b["copies"]["repos"] == ["local", "s3"])
    walls = []
    for _ in range(runs):
        bench.prepare_step()  # idle machine; cold page cache for the first look at the repository
        run = run_measured(
            [str(DRKIT), "replicate", "--config", str(dk.config)],
            log=bench.log,
            env={**os.environ, **server.env()},
        )
        walls.append(run.wall_s)
        print(f"  drkit replicate: {run.wall_s:.2f}s wall, CPU {run.cpu_s:.2f}s", flush=True)
    tiny.cleanup()
    return {
        "backups": len(info["backups"]),
        "on_local_and_s3": on_both,
        "repo_mib": tree_size(dk.repo_path) / MiB,
        "first_replicate_report": first,
        "replicate_walls": walls,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2, help="backups per configuration in (a)")
    parser.add_argument("--backups", type=int, default=100, help="backups in (b)")
    parser.add_argument("--runs", type=int, default=3, help="timed replicate runs in (b)")
    parser.add_argument("--only", choices=("a", "b"))
    parser.add_argument(
        "--moto-in-memory", action="store_true", help="moto keeps objects in memory, not in files"
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    root = Path(tempfile.mkdtemp(prefix="drkit-bench-copies-", dir=args.workdir))
    root.chmod(0o755)
    bench = Bench(root, args.scale)
    print(f"scratch directory {root}; {os.cpu_count()} CPUs; {drkit_version()}")
    print(f"page cache drop: {bench.cache_drop_works} (Cached {cached_mib():.0f} MiB)")
    print(f"moto keeps objects {'in memory' if args.moto_in_memory else 'over 5 MiB in files'}")
    # moto keeps objects over 5 MiB in temporary files by default: writing each multipart object
    # twice (parts, then the whole) costs it ~1 s of CPU on the cores drkit uses.
    moto_env = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(1 << 30)} if args.moto_in_memory else {}
    server = MotoS3Server(log_dir=root / "moto", env=moto_env)
    report: dict[str, object] = {}
    saved_env = dict(os.environ)
    try:
        server.start()
        os.environ.update(server.env())  # for the in-process drkit calls (init, info, backups)
        if args.only in (None, "a"):
            print(f"(a) full backup at scale {args.scale}: local only vs local + S3 (moto)")
            a = fan_out(bench, server, args.repeat)
            report["fan_out"] = a
            print(
                f"\n(a) database {a['database_mib']:.0f} MiB, backup {a['backup_mib']:.0f} MiB;"
                f" full backup local only {a['local_s']:.2f}s, local + S3 {a['local_s3_s']:.2f}s"
                f" (medians of {args.repeat}): added {a['added_pct']:.0f}% (target <= 50%:"
                f" {'PASS' if a['added_pct'] <= 50 else 'FAIL'})\n",
                flush=True,
            )
        if args.only in (None, "b"):
            print(f"(b) {args.backups} backups of a tiny cluster on local + S3, then replicate")
            b = many_backups(bench, server, args.backups, args.runs)
            report["replicate"] = b
            worst = max(b["replicate_walls"])
            print(
                f"\n(b) {b['backups']} backups ({b['on_local_and_s3']} on local and S3),"
                f" first replicate copied: {json.dumps(b['first_replicate_report'])[:300]}\n"
                f"    drkit replicate with nothing to do: "
                + ", ".join(f"{w:.2f}s" for w in b["replicate_walls"])
                + f" (target < 2 s: {'PASS' if worst < 2 else 'FAIL'})"
            )
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        server.close()
        if args.keep:
            print(f"kept {root}")
        else:
            stop_clusters_under(root)
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
