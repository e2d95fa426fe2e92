"""The sample report in docs/: docs/sample-report.html and its screenshot docs/sample-report.png.

    .venv/bin/python scripts/sample_report.py [--out DIR] [--no-screenshot]

Seeds a quarter of history into two local repositories (no PostgreSQL: synthetic manifests
sealed like real ones, drill records, notes, verification and job records, all with chosen
times — tests/rig/history.py), then makes the 2026Q4 report with the clock on 2027-01-04, as
`drkit report --quarter 2026Q4` would. The screenshot is taken by headless Chromium (Debian's
`chromium` package), offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rig.history import at, drill_record, seed_backups, seed_verify  # noqa: E402

from drkit.config.settings import load_settings  # noqa: E402
from drkit.crypto.keyfile import create_keyfile  # noqa: E402
from drkit.repo.drills import DrillKind, seal_drill_record  # noqa: E402
from drkit.repo.events import JobEvent, write_event  # noqa: E402
from drkit.repo.open import open_key_provider, open_repository  # noqa: E402
from drkit.report.notes import add_finding, add_signoff  # noqa: E402
from drkit.report.operation import ReportOperation, ReportRequest  # noqa: E402
from drkit.report.period import quarter  # noqa: E402

NOW = at("2027-01-04 09:00")
SYSTEM_IDENTIFIER = 7412345678901234567


def seed(root: Path) -> Path:
    """Two repositories with a quarter of history; returns the drkit.toml that names them."""
    create_keyfile(root / "backup.key")
    config = root / "drkit.toml"
    config.write_text(
        f'lock_path = "{root / "locks"}"\n'
        f'[postgres]\npgdata = "{root / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{root / "backup.key"}"\n'
        f'[drill]\nrto = "1h"\nrpo = "15m"\n'
        f'[[repo]]\nname = "local"\npath = "{root / "local"}"\n'
        f'[[repo]]\nname = "offsite"\npath = "{root / "offsite"}"\nmedia = "object-storage"\n'
        "offsite = true\n"
    )
    settings = load_settings(config)
    local, offsite = (open_repository(settings, name) for name in ("local", "offsite"))
    for repo in (local, offsite):
        repo.initialize(SYSTEM_IDENTIFIER)
    # A full every Sunday, an incremental every 6 hours; the offsite copy lags the last 2 days.
    backups = seed_backups(
        [local, offsite], at("2026-09-27 01:00"), at("2026-12-30 01:00"), every=timedelta(hours=6)
    )
    backups += seed_backups(
        [local], at("2026-12-30 01:00"), at("2027-01-01 00:00"), every=timedelta(hours=6)
    )
    fulls = [b for b in backups if b.label.endswith("F")]
    for full in fulls:  # verify every full in both repositories the day after
        for repo in (local, offsite):
            seed_verify(repo, full.label, full.start + timedelta(days=1), ok=True)
    damaged = next(f for f in fulls if f.start >= at("2026-11-08 00:00"))
    seed_verify(local, damaged.label, at("2026-11-15 04:00"), ok=False, damaged=1)
    seed_verify(local, damaged.label, at("2026-11-16 04:00"), ok=True)  # after drkit replicate
    write_event(
        local.storage,
        JobEvent("incr", False, at("2026-11-08 13:00"), 3.1, 4, "cannot connect to PostgreSQL"),
    )
    newest = {b.start: b.label for b in backups}

    def backup_before(when: str) -> str:
        return newest[max(t for t in newest if t <= at(when))]

    drills = {
        "q3-full": drill_record(
            at("2026-09-14 06:00"),
            kind=DrillKind.FULL,
            scenario="site-loss",
            rto=2400,
            rpo=420,
            rto_target=3600,
            rpo_target=900,
            repository="offsite",
            backup="20260913-010000F",
        ),
        "oct": drill_record(
            at("2026-10-06 03:00"),
            backup=backup_before("2026-10-06 03:00"),
            rto=840,
            rpo=180,
            rto_target=3600,
            rpo_target=900,
        ),
        "partial": drill_record(
            at("2026-10-20 03:00"),
            kind=DrillKind.PARTIAL,
            scenario="ransomware",
            repository="offsite",
            backup=backup_before("2026-10-20 03:00"),
            rto=2950,
            rpo=600,
            rto_target=3600,
            rpo_target=900,
        ),
        "dec-fail": drill_record(
            at("2026-12-02 03:00"),
            backup=backup_before("2026-12-02 03:00"),
            rto=910,
            rpo=240,
            rto_target=3600,
            rpo_target=900,
            failed_check="orders: count 0, expected at least 1000",
        ),
        "dec": drill_record(
            at("2026-12-03 03:00"),
            backup=backup_before("2026-12-03 03:00"),
            rto=880,
            rpo=150,
            rto_target=3600,
            rpo_target=900,
        ),
    }
    keys = open_key_provider(settings.keys)
    for record in drills.values():
        sealed = seal_drill_record(record, keys)
        for repo in (local, offsite):
            repo.write_drill_record(sealed)
    add_finding(
        settings,
        drills["partial"].id,
        "WAL fetch from the offsite copy was 40% of the RTO",
        action="enable async WAL prefetch for restores",
        owner="dba",
        now=at("2026-10-21 10:00"),
    )
    add_finding(
        settings,
        drills["dec-fail"].id,
        "the orders check ran against a database the restore point predates",
        action="check a table that exists since the first backup; rerun",
        owner="sre",
        now=at("2026-12-02 11:00"),
    )
    add_signoff(settings, "2026Q4", "J. Doe, DBA lead", "reviewed with the SRE team", now=NOW)
    return config


def screenshot(html: Path, png: Path, profile: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit(
            "sample_report: chromium is needed for the screenshot (apt-get install chromium)"
        )
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            "--window-size=1000,1900",
            f"--screenshot={png}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-screenshot", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="drkit-sample-report-"))
    try:
        settings = load_settings(seed(root))
        request = ReportRequest(
            period=quarter("2026Q4"), formats=("html", "json"), out=root / "out", now=NOW
        )
        result = ReportOperation(settings, request).run()
        args.out.mkdir(parents=True, exist_ok=True)
        html = args.out / "sample-report.html"
        shutil.copyfile(result.paths["html"], html)
        data = json.loads(result.paths["json"].read_text())
        print(data["summary"]["verdict_line"])
        print(f"wrote {html}")
        if not args.no_screenshot:
            png = args.out / "sample-report.png"
            screenshot(html, png, root / "chromium")
            print(f"wrote {png}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
