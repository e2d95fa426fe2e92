"""drkit report: a quarter of history (two real backups of PostgreSQL 15, copied to S3, and
drill records seeded with chosen times) turned into the report an auditor reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rig.drkit import Drkit
from rig.history import at, drill_record
from rig.postgres import PgFactory
from rig.servers import S3Server

from drkit.config.settings import Settings, load_settings
from drkit.crypto.keyfile import KeyfileProvider, create_keyfile
from drkit.repo.drills import DrillKind, DrillRecord, seal_drill_record
from drkit.repo.events import JobEvent, write_event
from drkit.repo.label import BackupLabel
from drkit.repo.open import open_key_provider, open_repository
from drkit.repo.repository import Repository
from drkit.report.model import json_schema
from drkit.report.operation import ReportOperation, ReportRequest, ReportResult
from drkit.report.period import Period, quarter_of
from drkit.storage.posix import PosixStorage

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = REPO_ROOT / "docs" / "report.schema.json"
CHROMIUM = shutil.which("chromium")


@dataclass
class Quarter:
    dk: Drkit
    settings: Settings
    period: Period
    now: datetime  # the report's clock: after the quarter ended
    backups: list[str]  # the real backups' labels
    drills: dict[str, DrillRecord]  # by name: d1 .. d4

    def report(self, out: Path, *formats: str, repo: str | None = None) -> ReportResult:
        request = ReportRequest(
            period=self.period, formats=formats or ("json",), out=out, repo=repo, now=self.now
        )
        return ReportOperation(self.settings, request).run()


def _month(period: Period, index: int, day: int) -> datetime:
    start = period.start
    month = start.month - 1 + index
    return start.replace(year=start.year + month // 12, month=month % 12 + 1, day=day, hour=3)


@pytest.fixture
def quarter(pg_factory: PgFactory, workdir: Path, s3: S3Server, new_bucket) -> Quarter:  # type: ignore[no-untyped-def]
    """PostgreSQL 15 with a full and an incremental backup in a local repository and an offsite
    S3 one, and four drills of the backups' quarter written into both: a restore test and a
    partial drill in its first month, none in the second, a failed restore test (RTO missed)
    and a full drill in the third; a failed incremental backup run in the second month."""
    bucket = new_bucket()
    cluster = pg_factory(15)
    cluster.run_bin("pgbench", "-i", "-s", "1", "-q")
    s3_repo = {
        "name": "s3-eu",
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/main",
        "endpoint_url": s3.endpoint_url,
        "region": "us-east-1",
        "offsite": True,
        "max_attempts": 2,
    }
    dk = Drkit(cluster, workdir, extra_repos=[s3_repo])
    dk.ok("init")
    dk.ok("backup", "--type", "full")
    cluster.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid < 500")
    dk.ok("backup", "--type", "incr")
    settings = load_settings(dk.config)
    local = open_repository(settings, "local")
    backups = [str(label) for label in local.backups()]
    period = quarter_of(BackupLabel(backups[0]).time)
    full = backups[0]
    drills = {
        "d1": drill_record(_month(period, 0, 6), backup=full, rto=900, rpo=300),
        "d2": drill_record(
            _month(period, 0, 21),
            kind=DrillKind.PARTIAL,
            scenario="site-loss",
            repository="s3-eu",
            backup=full,
            rto=1800,
            rpo=90,
        ),
        "d3": drill_record(_month(period, 2, 2), backup=full, rto=20000, rpo=200),
        "d4": drill_record(
            _month(period, 2, 15), kind=DrillKind.FULL, scenario="site-loss", rto=3000, rpo=60
        ),
    }
    failed = JobEvent("incr", False, _month(period, 1, 10), 3.2, 4, "cannot connect to PostgreSQL")
    local = open_repository(settings, "local")
    write_event(local.storage, local.auth, failed)
    keys = open_key_provider(settings.keys)
    signing = open_repository(settings, "local").auth
    for record in drills.values():
        sealed = seal_drill_record(record, keys, signing)
        for name in ("local", "s3-eu"):
            open_repository(settings, name).write_drill_record(sealed)
    return Quarter(dk, settings, period, period.end + timedelta(days=5), backups, drills)


def _json(result: ReportResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.paths["json"].read_text())
    return data


def test_the_report_lists_each_drill_with_its_numbers_and_flags_the_missing_month(
    quarter: Quarter, workdir: Path
) -> None:
    d = quarter.drills
    note = quarter.dk.run(
        "drill",
        "note",
        d["d3"].id,
        "--finding",
        "WAL fetch from S3 was 40% of the RTO",
        "--action",
        "enable async prefetch",
        "--owner",
        "dba",
    )
    assert note.exit_code == 0, note.output
    assert "written to: local, s3-eu" in note.stdout
    signoff = quarter.dk.run(
        "drill", "signoff", "--quarter", quarter.period.label, "--by", "J. Doe, DBA lead"
    )
    assert signoff.exit_code == 0, signoff.output
    unknown = quarter.dk.run("drill", "note", "20200101-000000Z-0000", "--finding", "x")
    assert unknown.exit_code == 44
    assert (
        "no repository holds a readable record of drill '20200101-000000Z-0000'" in unknown.stderr
    )

    result = quarter.report(workdir / "out", "json", "md", "html")

    assert result.exit_code == 0
    data = _json(result)
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    rows = {row["id"]: row for row in data["drills"]}
    assert list(rows) == [d[n].id for n in ("d1", "d2", "d3", "d4")]
    assert rows[d["d2"].id]["kind"] == "partial"
    assert rows[d["d2"].id]["scenario"] == "site-loss"
    assert rows[d["d2"].id]["repository"] == "s3-eu"
    assert rows[d["d1"].id]["backup"] == quarter.backups[0]
    assert rows[d["d3"].id]["rto"] == {
        "target_seconds": 14400.0,
        "achieved_seconds": 20000.0,
        "met": False,
    }
    assert rows[d["d3"].id]["outcome"] == "FAIL"
    assert rows[d["d3"].id]["failure"] == "target-missed"
    assert [c["name"] for c in rows[d["d1"].id]["checks"]] == ["amcheck", "orders"]
    # restore --plan's prediction next to what restore + start took
    assert (rows[d["d1"].id]["predicted_seconds"], rows[d["d1"].id]["restore_seconds"]) == (
        765.0,
        810.0,
    )
    summary = data["summary"]
    assert (summary["drills"], summary["passed"], summary["failed"]) == (4, 3, 1)
    # best, lower median and worst, each with the drill it comes from
    assert summary["rto"]["best"] == {"seconds": 900.0, "drill": d["d1"].id}
    assert summary["rto"]["median"] == {"seconds": 1800.0, "drill": d["d2"].id}
    assert summary["rto"]["worst"] == {"seconds": 20000.0, "drill": d["d3"].id}
    assert summary["rpo"]["best"] == {"seconds": 60.0, "drill": d["d4"].id}
    assert summary["rpo"]["worst"] == {"seconds": 300.0, "drill": d["d1"].id}
    second_month = _month(quarter.period, 1, 1).strftime("%Y-%m")
    assert summary["verdict"] == "FAIL"
    assert summary["verdict_line"] == (
        f"FAIL: 1 drill failed; 1 backup run failed; restore test for {second_month} missing"
    )
    assert summary["backups_failed"] == 1
    [failure] = data["backups"]["failures"]
    assert (failure["job"], failure["exit_code"]) == ("incr", 4)
    assert failure["error"] == "cannot connect to PostgreSQL"
    assert sum(w["failed"] for w in data["backups"]["weeks"]) == 1
    cadence = {(c["kind"], c["period"]): (c["status"], c["drills"]) for c in data["cadence"]}
    months = [_month(quarter.period, i, 1).strftime("%Y-%m") for i in range(3)]
    assert cadence[("restore-test", months[0])] == ("passed", [d["d1"].id, d["d2"].id])
    assert cadence[("restore-test", months[1])] == ("missing", [])
    assert cadence[("restore-test", months[2])] == ("passed", [d["d3"].id, d["d4"].id])
    assert cadence[("partial", quarter.period.label)] == ("passed", [d["d2"].id, d["d4"].id])
    assert [c["status"] for c in data["cadence"] if c["kind"] == "full"] == ["passed"]
    # the real backups, both copied offsite: 3 copies, 2 media, 1 offsite each
    assert [b["label"] for b in data["backups"]["items"]] == quarter.backups
    assert [b["type"] for b in data["backups"]["items"]] == ["full", "incr"]
    assert all(
        b["rule_3_2_1"] and b["repos"] == ["local", "s3-eu"] for b in data["backups"]["items"]
    )
    assert sum(w["full"] + w["incr"] for w in data["backups"]["weeks"]) == 2
    assert data["copies"]["passing"] == 2
    assert data["backups"]["failures_recorded"] is True
    assert data["keys"]["sets"] >= 2 and data["keys"]["escrowed"] == 0
    # findings and the sign-off, from their write-once records
    [finding] = data["findings"]
    assert (finding["drill"], finding["action"], finding["owner"]) == (
        d["d3"].id,
        "enable async prefetch",
        "dba",
    )
    assert rows[d["d3"].id]["findings"] == [finding["id"]]
    assert [s["by"] for s in data["signoffs"]] == ["J. Doe, DBA lead"]
    assert data["source"]["repository"] == "local"
    assert data["source"]["drkit_version"]
    assert re.fullmatch(r"[0-9a-f]{64}", data["source"]["config_digest"])
    # the same facts in the Markdown and the HTML
    md = result.paths["md"].read_text()
    assert f"| {months[1]} | **MISSING** |" in md.replace("restore-test | ", "")
    assert "WAL fetch from S3 was 40% of the RTO" in md
    html = result.paths["html"].read_text()
    assert f'id="drill-{d["d3"].id}"' in html
    assert "J. Doe, DBA lead" in html


def test_the_html_renders_offline_in_chromium_and_the_pdf_has_pages(
    quarter: Quarter, workdir: Path
) -> None:
    assert CHROMIUM is not None, "Debian's chromium package is needed (.ci/run installs it)"
    result = quarter.report(workdir / "out", "html", "pdf")

    html = result.paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    shot = workdir / "shot.png"
    browser = _chromium(workdir, f"--screenshot={shot}", "--window-size=1100,2400", result)
    assert "CONSOLE" not in browser.stderr, browser.stderr
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and charts, not a blank page
    netlog = workdir / "netlog.json"
    dom = _chromium(workdir, "--dump-dom", f"--log-net-log={netlog}", result).stdout
    # Every request the page made (Chromium's own background requests aside): none left the file.
    events = json.loads(netlog.read_text())["events"]
    fetched = {
        e["params"]["url"]
        for e in events
        if "file://" in str(e.get("params", {}).get("network_isolation_key", ""))
    }
    assert all(url.startswith(("file:", "data:")) for url in fetched), fetched
    for chart in ("chart-rto", "chart-rpo", "chart-duration", "chart-size", "chart-exposure"):
        svg = re.search(rf'<svg[^>]*id="{chart}".*?</svg>', dom, re.DOTALL)
        assert svg is not None, f"{chart} is not in the rendered page"
        assert svg.group(0).count('<circle class="point"') >= 2, chart
    rto = re.search(r'<svg[^>]*id="chart-rto".*?</svg>', dom, re.DOTALL)
    assert rto is not None
    assert all(f'data-ref="{r.id}"' in rto.group(0) for r in quarter.drills.values())
    assert dom.count('class="cell missing"') == 1

    info = subprocess.run(
        ["pdfinfo", str(result.paths["pdf"])], capture_output=True, text=True, check=True
    ).stdout
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert pages >= 3
    text = subprocess.run(
        ["pdftotext", str(result.paths["pdf"]), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "MISSING" in text and quarter.drills["d3"].id in text


def test_a_report_from_the_s3_copy_alone_equals_the_one_from_the_primary(
    quarter: Quarter, workdir: Path
) -> None:
    # a drill whose record reached the offsite copy only (the primary was down when it ran)
    late = drill_record(_month(quarter.period, 1, 12), backup=quarter.backups[0], rto=700, rpo=30)
    open_repository(quarter.settings, "s3-eu").write_drill_record(late)

    primary = _json(quarter.report(workdir / "primary", repo="local"))
    offsite = _json(quarter.report(workdir / "offsite", repo="s3-eu"))

    assert late.id in [d["id"] for d in primary["drills"]]
    month = _month(quarter.period, 1, 1).strftime("%Y-%m")
    [second] = [c for c in primary["cadence"] if c["period"] == month]
    assert (second["status"], second["drills"]) == ("passed", [late.id])

    assert primary["source"].pop("repository") == "local"
    assert offsite["source"].pop("repository") == "s3-eu"
    assert offsite == primary

    # the primary site is gone: the offsite copy still tells the whole story of the drills
    shutil.rmtree(quarter.dk.repo_path)
    alone = _json(quarter.report(workdir / "alone"))
    assert alone["source"]["repository"] == "s3-eu"
    for section in ("drills", "cadence", "findings", "signoffs"):
        assert alone[section] == primary[section], section
    for key in ("drills", "passed", "failed", "unauthentic", "rto", "rpo", "cadence_missing"):
        assert alone["summary"][key] == primary["summary"][key], key
    # failed runs are recorded in the primary only: now unknown, and said so
    assert alone["summary"]["backups_failed"] is None
    assert "failed backup runs unknown" in alone["summary"]["verdict_line"]
    assert [b["label"] for b in alone["backups"]["items"]] == quarter.backups
    local = next(r for r in alone["source"]["repositories"] if r["name"] == "local")
    assert local["reachable"] is False and "not initialized" in local["error"]
    assert alone["copies"]["failing"] == 2  # the live database and S3 only: 2 copies


def test_a_tampered_drill_record_is_reported_as_failing_authentication(
    quarter: Quarter, workdir: Path
) -> None:
    tampered = quarter.drills["d2"]
    path = quarter.dk.repo_path / f"drills/{tampered.id}/record"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(blob))

    result = quarter.report(workdir / "out", "json", "html", repo="local")

    data = _json(result)
    row = next(r for r in data["drills"] if r["id"] == tampered.id)
    assert row["authentic"] is False
    assert f"drill record '{tampered.id}' fails authentication" in row["error"]
    assert row["kind"] is None and row["rto"] is None  # nothing of it is believed
    assert data["summary"]["unauthentic"] == 1
    assert "1 drill record fails authentication" in data["summary"]["verdict_line"]
    assert len(data["drills"]) == 4  # listed, not dropped
    html = result.paths["html"].read_text()
    assert (
        f'<span class="id">{tampered.id}</span> <span class="unauthentic">FAILS AUTHENTICATION'
        in html
    )
    # a damaged note is listed as such too, not dropped
    assert quarter.dk.run("drill", "note", tampered.id, "--finding", "slow").exit_code == 0
    [note] = [p for p in (quarter.dk.repo_path / "notes").glob("*/record")]
    note.chmod(0o600)
    note.write_bytes(note.read_bytes()[:-1] + b"\x00")
    data = _json(quarter.report(workdir / "again", "json", repo="local"))
    [finding] = data["findings"]
    assert finding["authentic"] is False and "fails authentication" in finding["error"]
    # the partial drill no longer counts: its record cannot be trusted
    cadence = {(c["kind"], c["period"]): c for c in data["cadence"]}
    assert cadence[("partial", quarter.period.label)]["drills"] == [quarter.drills["d4"].id]


def test_the_command_writes_a_span_of_days_where_the_configuration_says(
    quarter: Quarter, workdir: Path
) -> None:
    reports = workdir / "reports"
    quarter.dk.write_config(report={"out": reports})
    first, last = quarter.period.start.date(), quarter.period.last_day

    result = quarter.dk.run(
        "report", "--from", first.isoformat(), "--to", last.isoformat(), "--format", "md"
    )

    assert result.exit_code == 0, result.output
    name = f"drkit-report-{first.isoformat()}_{last.isoformat()}.md"
    verdict, written = result.stdout.splitlines()
    # the real clock: whether the quarter's months have ended varies, the failed drill does not
    assert verdict.startswith("FAIL: 1 drill failed; 1 backup run failed")
    assert written == f"md: {reports / name}"
    assert (
        f"# DR exercise report {first.isoformat()}..{last.isoformat()}"
        in (reports / name).read_text()
    )
    both = quarter.dk.run(
        "report", "--quarter", "2026Q4", "--from", "2026-10-01", "--to", "2026-10-02"
    )
    assert both.exit_code == 2 and "give --quarter or --from/--to, not both" in both.output
    bad = quarter.dk.run("report", "--quarter", "2026Q5")
    assert bad.exit_code == 2 and "'2026Q5' is not a quarter such as '2026Q4'" in bad.output


def test_no_drill_in_a_quarter_is_said_in_red(quarter: Quarter, workdir: Path) -> None:
    empty = quarter_of(quarter.period.end + timedelta(days=1))
    request = ReportRequest(
        period=empty, formats=("json", "html"), out=workdir, now=empty.end + timedelta(days=1)
    )
    result = ReportOperation(quarter.settings, request).run()

    data = _json(result)
    assert data["drills"] == []
    assert data["summary"]["verdict_line"].startswith("FAIL: no drill this period")
    html = result.paths["html"].read_text()
    assert '<p class="alert" id="no-drill">No drill this period.</p>' in html


def test_the_sample_in_the_docs_is_one_self_contained_file() -> None:
    html = (REPO_ROOT / "docs" / "sample-report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert (
        "FAIL: 1 drill failed; 1 backup run failed; restore test for 2026-11 missing; the newest"
        " backup 20261230-010000F_20261231-190000I does not meet 3-2-1"
    ) in html
    assert (REPO_ROOT / "docs" / "sample-report.png").read_bytes().startswith(b"\x89PNG")


def test_the_schema_in_the_docs_is_the_models() -> None:
    assert json.loads(SCHEMA.read_text()) == json_schema()


def _chromium(
    workdir: Path, action: str, extra: str, result: ReportResult
) -> subprocess.CompletedProcess[str]:
    profile = workdir / f"chromium-{uuid.uuid4().hex[:8]}"
    args = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        action,
        *([extra] if extra else []),
        result.paths["html"].as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)


def test_a_pdf_without_weasyprint_exits_43_and_writes_the_other_formats(tmp_path: Path) -> None:
    """No PostgreSQL needed: a seeded repository; WeasyPrint made unloadable the way a missing
    Pango library makes it (OSError at import), in a real drkit process."""
    create_keyfile(tmp_path / "backup.key")
    repo = Repository(
        PosixStorage(tmp_path / "repo", name="local"), KeyfileProvider(tmp_path / "backup.key")
    )
    repo.initialize(7000000000000000001)
    repo.write_drill_record(drill_record(at("2026-10-05 03:00")))
    config = tmp_path / "drkit.toml"
    config.write_text(
        f'lock_path = "{tmp_path / "locks"}"\n[postgres]\npgdata = "{tmp_path / "pgdata"}"\n'
        f'[keys]\nprovider = "keyfile"\nkeyfile = "{tmp_path / "backup.key"}"\n'
        f'[[repo]]\nname = "local"\npath = "{tmp_path / "repo"}"\n'
    )
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "weasyprint.py").write_text("raise OSError(\"cannot load library 'libpango-1.0-0'\")\n")
    env = {**os.environ, "PYTHONPATH": str(stub)}

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "drkit",
            "report",
            "--quarter",
            "2026Q4",
            "--format",
            "pdf",
            "--format",
            "json",
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert done.returncode == 43, done.stderr
    json_file = tmp_path / "out" / "drkit-report-2026Q4.json"
    assert done.stderr.splitlines()[-2:] == [
        "error: cannot render PDF: WeasyPrint is not usable (cannot load library"
        f" 'libpango-1.0-0'); written: {json_file}",
        "HINT: pip install 'drkit[pdf]' and the Pango library (Debian: apt-get install"
        " libpango-1.0-0 libpangoft2-1.0-0), or print the HTML report",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["drkit-report-2026Q4.json"]
