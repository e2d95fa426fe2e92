"""`drkit restore --plan`'s prediction against what a drill then takes.

1. Builds a PostgreSQL 15 cluster (the test rig's) with a pgbench database at ``--scale``, WAL
   archiving into a drkit repository, a full backup, then ``--traffic`` pgbench transactions
   archived after it (WAL the copy replays).
2. Runs ``--drills`` drills (newest backup + archive), printing each one's phases.
3. ``drkit restore --plan --target-latest --json``: the expected duration from those drills.
4. One more drill, which records that prediction (``predicted_seconds``): prints it next to what
   the drill's restore and start took, and the error in percent.

Run as root with the project's venv: ``.venv/bin/python bench/bench_predict.py --scale 50``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import PG_VERSION, scratch_dir
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import (
    clone_cluster,
    make_rig_dir,
    make_template,
)

UNTIL_PROMOTED = ("restore", "wal-replay+start")


def drill(dk: Drkit) -> dict[str, Any]:
    result = dk.run("drill", "--json")
    record: dict[str, Any] = json.loads(result.stdout)["record"]
    if record["outcome"] != "PASS":
        raise SystemExit(f"drill failed: {record['reason']}")
    phases = {p["name"]: p["seconds"] for p in record["phases"]}
    took = sum(phases[name] for name in UNTIL_PROMOTED)
    print(
        f"  drill {record['id']}: restore {phases['restore']:.1f}s ({record['restored_bytes']}"
        f" bytes), wal-replay+start {phases['wal-replay+start']:.1f}s"
        f" ({record['wal_segments']} segments), until promoted {took:.1f}s"
    )
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (1 ≈ 15 MiB)")
    parser.add_argument("--traffic", type=int, default=20000, help="pgbench transactions after")
    parser.add_argument("--drills", type=int, default=3, help="drills the prediction rests on")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()

    with scratch_dir("drkit-bench-predict-", args.workdir) as root:
        cluster = clone_cluster(make_template(PG_VERSION, root), PG_VERSION, root)
        cluster.start()
        print(f"building a pgbench database at scale {args.scale}")
        cluster.run_bin("pgbench", "-i", "-q", "-s", str(args.scale), timeout=3600)
        dk = Drkit(cluster, make_rig_dir(root, "work-"))
        dk.ok("init")
        sandboxes = make_rig_dir(root, "sb-")
        enable_archiving(cluster, dk, sections={"drill": {"sandbox": sandboxes}})
        dk.ok("backup")
        cluster.run_bin("pgbench", "-n", "-c", "2", "-j", "2", "-t", str(args.traffic // 2))
        wait_archived(cluster, switch_wal(cluster))

        print(f"{args.drills} drills")
        for _ in range(args.drills):
            drill(dk)
        plan = json.loads(dk.ok("restore", "--plan", "--target-latest", "--json").stdout)
        prediction = plan["prediction"]
        print(
            f"restore --plan: {prediction['seconds']:.1f}s (restore"
            f" {prediction['restore_seconds']:.1f}s, start and replay"
            f" {prediction['replay_seconds']:.1f}s) for {plan['restore_bytes']} bytes and"
            f" {plan['wal']['fetched_segments']} segments, from {prediction['based_on_drills']}"
            " drills"
        )
        print("the next drill")
        record = drill(dk)
        phases = {p["name"]: p["seconds"] for p in record["phases"]}
        took = sum(phases[name] for name in UNTIL_PROMOTED)
        predicted = record["predicted_seconds"]
        error = 100 * (predicted - took) / took
        print(f"predicted {predicted:.1f}s, took {took:.1f}s: error {error:+.0f}% (goal ±25%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
