"""PITR replay through drkit wal-fetch, with and without fetching ahead, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages):

    .venv/bin/python bench/bench_wal_fetch.py [--segments 32] [--runs 2]

1. Builds a PostgreSQL 15 cluster (the test rig's), archiving with ``drkit wal-push`` into a local
   repository, takes a full backup, then bulk-inserts rows until ``--segments`` segments of WAL
   (each a full 16 MiB of row data) are archived.
2. Restores that backup with ``--target-latest`` and starts the server ``--runs`` times each with
   ``[archive] fetch_ahead = 0`` (one direct fetch per segment, as PostgreSQL asks) and ``= 8``
   (the background fetcher), alternating, and times start -> promoted.
3. Prints, per mode, the wall time to promotion and the milliseconds per replayed segment
   (segments counted in the server log's "restored log file" lines).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import PG_VERSION
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import (
    attach_cluster,
    clone_cluster,
    make_rig_dir,
    make_template,
    stop_clusters_under,
)

SEGMENT = 16 * 1024 * 1024


def build(root: Path, segments: int) -> Drkit:
    cluster = clone_cluster(make_template(PG_VERSION, root), PG_VERSION, root)
    cluster.start()
    workdir = make_rig_dir(root, "work-")
    dk = Drkit(cluster, workdir)
    dk.ok("init")
    enable_archiving(cluster, dk)
    cluster.psql("CREATE TABLE bulk (id bigint, v text)")
    dk.ok("backup")
    start = int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    print(f"writing {segments} segments of WAL ...", flush=True)
    batch = 0
    while int(cluster.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")) - start < (
        segments * SEGMENT
    ):
        cluster.psql(
            f"INSERT INTO bulk SELECT g, md5(g::text) || md5((g + {batch})::text)"
            f" FROM generate_series(1, 100000) g"
        )
        batch += 1
    wait_archived(cluster, switch_wal(cluster), timeout=600)
    return dk


def replay(dk: Drkit, root: Path, ahead: int) -> tuple[float, int]:
    """(seconds from start to promoted, segments restored from the archive)."""
    dk.write_config(archive={"spool_path": dk.workdir / "spool", "fetch_ahead": ahead})
    pgdata = root / f"restored-{ahead}"
    dk.ok("restore", "--pgdata", str(pgdata), "--target-latest")
    restored = attach_cluster(pgdata, PG_VERSION, root, {"archive_mode": "off"})
    began = time.monotonic()
    restored.start(timeout=600)
    restored.wait_promoted(timeout=600)
    elapsed = time.monotonic() - began
    count = restored.log_file.read_text().count("restored log file")
    restored.stop()
    restored.cleanup()
    shutil.rmtree(pgdata)
    return elapsed, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    root = make_rig_dir(Path("/tmp"), "bench-wal-fetch-")
    try:
        dk = build(root, args.segments)
        dk.cluster.stop()
        results: dict[int, list[tuple[float, int]]] = {0: [], 8: []}
        for _ in range(args.runs):
            for ahead in results:
                results[ahead].append(replay(dk, root, ahead))
                elapsed, count = results[ahead][-1]
                print(f"fetch_ahead={ahead}: {elapsed:.2f} s, {count} segments", flush=True)
        print("\n| fetch_ahead | runs | start -> promoted, s | ms per segment |")
        print("|---|---|---|---|")
        for ahead, runs in results.items():
            walls = [e for e, _ in runs]
            per = [1000 * e / max(c, 1) for e, c in runs]
            print(
                f"| {ahead} | {len(runs)} | {statistics.median(walls):.2f}"
                f" ({min(walls):.2f}-{max(walls):.2f}) | {statistics.median(per):.0f} |"
            )
    finally:
        stop_clusters_under(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
