"""drkit report over a year of hourly backups and 60 drills: how long it takes to make.

    .venv/bin/python bench/bench_report.py [--workdir DIR] [--keep] [--json FILE]

Seeds a local repository (no PostgreSQL: synthetic manifests sealed like real ones, one every
hour of a year with a weekly full, and 60 drill records) and times ``drkit report`` as the CLI
runs it (a fresh process, interpreter start-up included) for the year and for one quarter, HTML
and JSON. Target: the year's report in under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import scratch_dir
from rig.history import drill_record, seed_backups

from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.repo.drills import DrillKind
from drkit.repo.repository import Repository
from drkit.storage.posix import PosixStorage

TARGET_S = 5.0
YEAR = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def seed(root: Path) -> tuple[Path, int, int]:
    create_keyfile(root / "backup.key")
    repo = Repository(
        PosixStorage(root / "repo", name="local"), KeyfileProvider(root / "backup.key")
    )
    repo.initialize(7000000000000000001)
    backups = seed_backups([repo], *YEAR, every=timedelta(hours=1))
    kinds = [DrillKind.RESTORE_TEST] * 3 + [DrillKind.PARTIAL, DrillKind.FULL]
    drills = 0
    for i in range(60):  # every ~6 days, a mix of kinds, every seventh missing its RTO
        started = YEAR[0] + timedelta(days=6 * i + 1, hours=3)
        rto = 20000.0 if i % 7 == 6 else 600.0 + 30 * i
        kind = kinds[i % len(kinds)]
        repo.write_drill_record(drill_record(started, kind=kind, rto=rto, rpo=60 + i))
        drills += 1
    config = root / "drkit.toml"
    config.write_text(
        f'lock_path = "{root / "locks"}"\n'
        f'[postgres]\npgdata = "{root / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{root / "backup.key"}"\n'
        f'[[repo]]\nname = "local"\npath = "{root / "repo"}"\n'
    )
    return config, len(backups), drills


def timed_report(config: Path, out: Path, *period: str) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, every thread) of one ``drkit report`` process."""
    argv = [sys.executable, "-m", "drkit", "report", *period, "--out", str(out), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run([*argv, "--config", str(config)], capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"drkit report failed ({done.returncode}):\n{done.stderr}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with scratch_dir("drkit-bench-report-", args.workdir, keep=args.keep) as root:
        started = time.monotonic()
        config, backups, drills = seed(root)
        seeding = time.monotonic() - started
        print(f"seeded {backups} backups and {drills} drills in {seeding:.1f} s")
        year, year_cpu = timed_report(
            config, root / "year", "--from", "2026-01-01", "--to", "2026-12-31"
        )
        quarter, quarter_cpu = timed_report(config, root / "quarter", "--quarter", "2026Q4")
        html = root / "year" / "drkit-report-2026-01-01_2026-12-31.html"
        size = html.stat().st_size / 1024 / 1024
        verdict = "PASS" if year < TARGET_S else "FAIL"
        print(
            f"report of the year (html + json): {year:.2f} s wall, {year_cpu:.2f} s CPU"
            f"  [{verdict}: target < {TARGET_S} s]"
        )
        print(f"report of 2026Q4 (html + json):   {quarter:.2f} s wall, {quarter_cpu:.2f} s CPU")
        print(f"year's HTML: {size:.1f} MiB; load average {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "backups": backups,
                        "drills": drills,
                        "year_s": round(year, 3),
                        "year_cpu_s": round(year_cpu, 3),
                        "quarter_s": round(quarter, 3),
                        "quarter_cpu_s": round(quarter_cpu, 3),
                        "html_mib": round(size, 2),
                        "target_s": TARGET_S,
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()
