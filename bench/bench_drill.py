"""A drill's RTO against a bare `drkit restore` + start of the same backup: the drill's overhead.

1. Builds a PostgreSQL 15 cluster (the test rig's) with a pgbench database at ``--scale``, WAL
   archiving into a drkit repository, a full backup, then ``--traffic`` pgbench transactions
   archived after it (WAL both copies replay).
2. ``--rounds`` times, each after dropping the page cache:
   - bare: ``drkit restore --pgdata DIR --target-latest`` into an empty directory of the server
     user, then drkit's ``Cluster`` started on it (no TCP, ``archive_mode = off``) until
     promoted: the wall clock from the restore's start to promotion;
   - drill: ``drkit drill`` of the same backup and archive with no checks configured (the
     checks are the drill's purpose, not its overhead): its achieved RTO minus its checks
     phase (plan + restore + wal-replay+start), and the drill command's whole wall clock
     (teardown and the record on top).
3. Prints every round and the medians; the goal is an overhead of at most 5% or 1 s.

Run as root with the project's venv: ``.venv/bin/python bench/bench_drill.py --scale 50``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import PG_VERSION, prepare_step, scratch_dir
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import (
    chown_to_server_user,
    clone_cluster,
    make_rig_dir,
    make_template,
)

from drkit.pg.binaries import find_bindir
from drkit.pg.cluster import Cluster

NO_CHECKS = {"amcheck": False, "heartbeat": False}
UNTIL_PROMOTED = ("plan", "restore", "wal-replay+start")


def bare(dk: Drkit, root: Path, round_: int) -> dict[str, Any]:
    target = root / f"bare-{round_}"
    target.mkdir(mode=0o700)
    chown_to_server_user(target)
    server = Cluster(
        pgdata=target,
        bindir=find_bindir(PG_VERSION),
        socket_dir=root / f"bare-sock-{round_}",
        log_file=root / f"bare-{round_}.log",
        settings={"archive_mode": "off"},
    )
    started = time.monotonic()
    out = json.loads(dk.ok("restore", "--pgdata", str(target), "--target-latest", "--json").stdout)
    restored = time.monotonic()
    try:
        server.start(timeout=600)
        server.wait_promoted(timeout=600)
        promoted = time.monotonic()
    finally:
        server.stop("immediate")
        shutil.rmtree(target, ignore_errors=True)
    return {
        "restore": restored - started,
        "start": promoted - restored,
        "until_promoted": promoted - started,
        "detail": ", ".join(f"{k} {v:.1f}s" for k, v in out["phases"].items()),
    }


def drill(dk: Drkit) -> dict[str, Any]:
    started = time.monotonic()
    result = dk.run("drill", "--json")
    wall = time.monotonic() - started
    record: dict[str, Any] = json.loads(result.stdout)["record"]
    if record["outcome"] != "PASS":
        raise SystemExit(f"drill failed: {record['reason']}")
    phases = {p["name"]: p["seconds"] for p in record["phases"]}
    return {
        "phases": phases,
        "detail": next(p["detail"] for p in record["phases"] if p["name"] == "restore"),
        "until_promoted": sum(phases[name] for name in UNTIL_PROMOTED),
        "rto": record["rto"]["achieved_seconds"],
        "wall": wall,
        "segments": record["wal_segments"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (1 ≈ 15 MiB)")
    parser.add_argument("--traffic", type=int, default=20000, help="pgbench transactions after")
    parser.add_argument("--rounds", type=int, default=3, help="bare/drill pairs")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--quiet-timeout", type=float, default=30, help="seconds to wait for an idle machine"
    )
    args = parser.parse_args()

    with scratch_dir("drkit-bench-drill-", args.workdir) as root:
        cluster = clone_cluster(make_template(PG_VERSION, root), PG_VERSION, root)
        cluster.start()
        print(f"building a pgbench database at scale {args.scale}")
        cluster.run_bin("pgbench", "-i", "-q", "-s", str(args.scale), timeout=3600)
        dk = Drkit(cluster, make_rig_dir(root, "work-"))
        dk.ok("init")
        sandboxes = make_rig_dir(root, "sb-")
        drill_section = {"sandbox": sandboxes, "checks": NO_CHECKS}
        enable_archiving(cluster, dk, sections={"drill": drill_section})
        dk.ok("backup")
        cluster.run_bin("pgbench", "-n", "-c", "2", "-j", "2", "-t", str(args.traffic // 2))
        wait_archived(cluster, switch_wal(cluster))
        cluster.stop()  # idle from here on: both copies replay the same archive

        bares, drills = [], []
        for round_ in range(1, args.rounds + 1):
            # alternate which goes first, so neither always meets the same leftovers
            for which in ("bare", "drill") if round_ % 2 else ("drill", "bare"):
                prepare_step(args.quiet_timeout)
                if which == "bare":
                    b = bare(dk, root, round_)
                else:
                    d = drill(dk)
            bares.append(b)
            drills.append(d)
            p = d["phases"]
            print(
                f"round {round_}: bare restore {b['restore']:.2f}s ({b['detail']}) + start"
                f" {b['start']:.2f}s = {b['until_promoted']:.2f}s; drill plan {p['plan']:.2f}s"
                f" + restore {p['restore']:.2f}s ({d['detail']}) + wal-replay+start"
                f" {p['wal-replay+start']:.2f}s = {d['until_promoted']:.2f}s (RTO"
                f" {d['rto']:.2f}s, checks {p['checks']:.2f}s, teardown {p['teardown']:.2f}s,"
                f" command {d['wall']:.2f}s, {d['segments']} segments)"
            )
        base = statistics.median(b["until_promoted"] for b in bares)
        ours = statistics.median(d["until_promoted"] for d in drills)
        overhead = ours - base
        goal = max(0.05 * base, 1.0)
        verdict = "PASS" if overhead <= goal else "MISSED"
        print(
            f"median until promoted: bare {base:.2f}s, drill {ours:.2f}s: overhead"
            f" {overhead:+.2f}s ({100 * overhead / base:+.1f}%), goal <= {goal:.2f}s: {verdict}"
        )
        print(
            "median drill command wall (with teardown and record):"
            f" {statistics.median(d['wall'] for d in drills):.2f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
