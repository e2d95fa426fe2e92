"""Delta restore against a full restore of the same backup, in one run.

Run as root on a machine with PostgreSQL 15 (Debian packages):

    .venv/bin/python bench/bench_delta.py --scale 50 [--runs 2] [--warm] [--trust-timestamps]

It builds a pgbench database (the random profile of bench_full.py), takes a full backup and
restores it into a directory: the stale copy. Then 1% of the database changes, as in
bench_incr.py (pgbench_accounts compacted with VACUUM FULL before the first backup, unless
--as-built; then a contiguous 1% of the accounts updated and 1% more appended) and a second full
backup is taken.
Each run restores that second backup twice, timing the ``drkit restore`` command alone: into an
empty directory, and with ``--delta`` over a fresh stale copy. The page cache is dropped before
each (unless --warm): a stale copy is read from disk. With --trust-timestamps each run also
restores with ``--delta --trust-timestamps`` over a third fresh stale copy. Every delta-restored
copy is started and its data compared with the source's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_full import (
    DRKIT,
    RESTORED_CONF,
    Bench,
    build_source,
    empty_target,
    long_sql,
    start_until_promoted,
    summary,
)
from bench_incr import change_one_percent
from common import drop_page_cache, run_measured, scratch_dir
from rig.drkit import Drkit
from rig.postgres import attach_cluster, make_rig_dir


def restore(
    bench: Bench, config: list[str], pgdata: Path, *extra: str
) -> tuple[float, float, dict[str, Any]]:
    """Run ``drkit restore --json`` into ``pgdata``: its wall and CPU seconds, and its result."""
    log = bench.root / f"restore-{pgdata.name}.log"
    run = run_measured(
        [str(DRKIT), "restore", "--pgdata", str(pgdata), "--json", *extra, *config],
        log=log,
        cwd=bench.root,
    )
    # stdout's result among stderr's log records (JSON lines too): the one with phases
    text, decoder = log.read_text(), json.JSONDecoder()
    for start in (i + 1 for i, c in enumerate(text) if c == "\n" and text[i + 1 : i + 2] == "{"):
        with contextlib.suppress(ValueError):
            result, _ = decoder.raw_decode(text[start:])
            if "phases" in result and "label" in result:
                return run.wall_s, run.cpu_s, result
    raise RuntimeError(f"no result in {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache")
    parser.add_argument(
        "--as-built",
        action="store_true",
        help="no VACUUM FULL first: the change then lands all over pgbench_accounts",
    )
    parser.add_argument(
        "--trust-timestamps",
        action="store_true",
        help="also time a delta restore with --trust-timestamps",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it drops the page cache and runs PostgreSQL as 'postgres'")

    with scratch_dir("drkit-bench-delta-", args.workdir) as root:
        bench = Bench(root, args.scale)
        source = build_source(bench, "random")
        workdir = make_rig_dir(root, "drkit-")
        dk = Drkit(
            source,
            workdir,
            backup={
                "process_max": 2,
                "compress_level": 3,
                "start_fast": True,
                "chunk_size": 16 * 1024 * 1024,  # drkit's default (the test rig sets 4 MiB)
            },
        )
        dk.ok("init")
        config = ["--config", str(dk.config)]
        if not args.as_built:
            long_sql(source, "VACUUM FULL pgbench_accounts; CHECKPOINT")
        # Trusting timestamps never trusts a file written in the 2 s before a backup started; a
        # real copy's unchanged files are older than that
        time.sleep(3)
        first = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
        change_one_percent(bench, source)
        dk.ok("backup", "--type", "full")
        expected = summary(source)
        source.stop()

        ratios: dict[str, list[tuple[float, float, str]]] = {}
        variants = [("delta", ["--delta"])]
        if args.trust_timestamps:
            variants.append(("trusting timestamps", ["--delta", "--trust-timestamps"]))
        for run in range(1, args.runs + 1):
            target = empty_target(bench, f"full-{run}")
            if not args.warm:
                drop_page_cache()
            full_wall, full_cpu, result = restore(bench, config, target.pgdata)
            shutil.rmtree(target.pgdata)
            print(
                f"run {run}: full restore {full_wall:.2f} s wall ({full_cpu:.2f} s CPU);"
                f" {breakdown(full_wall, result)}",
                flush=True,
            )
            for variant, (name, options) in enumerate(variants, 1):
                stale = root / f"stale-{run}-{variant}"  # its own log (restore-<name>.log)
                stale.mkdir(mode=0o700)
                shutil.chown(stale, "postgres", "postgres")
                dk.ok("restore", "--backup", first, "--pgdata", str(stale))
                if not args.warm:
                    drop_page_cache()
                delta_wall, delta_cpu, result = restore(bench, config, stale, *options)
                copy = attach_cluster(stale, bench.version, bench.root)
                copy.set_conf(RESTORED_CONF)
                start_until_promoted(copy)
                verified = "ok" if summary(copy) == expected else "MISMATCH"
                copy.cleanup()
                shutil.rmtree(stale)
                ratios.setdefault(name, []).append(
                    (delta_wall / full_wall, delta_cpu / full_cpu, verified)
                )
                print(
                    f"  {name}: {delta_wall:.2f} s wall ({delta_cpu:.2f} s CPU) ="
                    f" {delta_wall / full_wall:.0%} of the full's wall,"
                    f" {delta_cpu / full_cpu:.0%} of its CPU; {breakdown(delta_wall, result)};"
                    f" {result['delta']}; data {verified}",
                    flush=True,
                )
        print(f"scale {args.scale}, load average at the end {os.getloadavg()[0]:.1f}:")
        for name, measured in ratios.items():
            walls = ", ".join(f"{wall:.0%}" for wall, _, _ in measured)
            cpus = ", ".join(f"{cpu:.0%}" for _, cpu, _ in measured)
            data = "ok" if all(v == "ok" for _, _, v in measured) else "MISMATCH"
            print(f"  {name}: {walls} of the full's wall ({cpus} of its CPU); data {data}")
        return 0


def breakdown(wall: float, result: dict[str, Any]) -> str:
    """The command's phases, and what the wall spent outside them: start-up (interpreter,
    imports, settings) and exit."""
    phases: dict[str, float] = result["phases"]
    inside = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
    return f"phases {inside}; outside them {wall - sum(phases.values()):.2f} s"


if __name__ == "__main__":
    sys.exit(main())
