"""Drill records through the CLI: written to every repository, `drkit drill list`, `drkit info`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rig.drkit import Drkit
from rig.postgres import PgCluster
from test_drill_records import make_record

from drkit.config.settings import load_settings
from drkit.errors import DrillRecordNotWritten
from drkit.repo.drill_copies import write_drill_record_everywhere
from drkit.repo.drills import DrillOutcome, FailureKind, Objective


def two_repos(pg: PgCluster, workdir: Path) -> Drkit:
    dk = Drkit(pg, workdir, extra_repos=[{"name": "second", "path": workdir / "second"}])
    dk.ok("init")
    return dk


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x40
    path.chmod(0o600)
    path.write_bytes(bytes(blob))


def test_records_go_everywhere_and_drill_list_shows_them(pg: PgCluster, workdir: Path) -> None:
    dk = two_repos(pg, workdir)
    label = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
    settings = load_settings(dk.config)
    now = datetime.now(UTC)
    passed = make_record(now - timedelta(days=1), backup=label)
    failed = make_record(now, backup=label, outcome=DrillOutcome.FAIL).model_copy(
        update={
            "failure": FailureKind.TARGET_MISSED,
            "scenario": "site-loss",
            "rto": Objective(target_seconds=1, achieved_seconds=95, met=False),
        }
    )
    for record in (passed, failed):
        copies = write_drill_record_everywhere(settings, record)
        assert (copies.written, copies.warnings) == (["local", "second"], [])

    listed = dk.run("drill", "list", "--json")
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert [d["id"] for d in data["drills"]] == [passed.id, failed.id]
    assert all(d["repositories"] == ["local", "second"] for d in data["drills"])
    assert data["drills"][1]["record"]["failure"] == "target-missed"
    assert data["drills"][0]["record"]["restore_point"]["backup"] == label

    text = dk.ok("drill", "list").stdout.splitlines()
    header = "ID STARTED KIND SCENARIO BACKUP REPOSITORY RTO RPO RESULT"
    assert text[0].split() == header.split()
    assert text[1].split()[2:] == [
        "restore-test",
        "-",
        label,
        "local",
        "38.2s/4h",
        "12.0s/1h",
        "PASS",
    ]
    assert text[2].split()[2:] == [
        *("restore-test", "site-loss", label, "local", "1m35s/1.0s", "12.0s/1h"),
        *("FAIL", "(target-missed)"),
    ]

    # A damaged copy: the drill still shows (from the sound copy), the damage is a warning.
    flip_a_byte(workdir / "second" / f"drills/{failed.id}/record")
    damaged = dk.run("drill", "list", "--json")
    assert damaged.exit_code == 117, damaged.output
    entry = json.loads(damaged.stdout)["drills"][1]
    assert entry["authentic"] and entry["repositories"] == ["local"]
    assert "fails authentication" in entry["errors"]["second"]
    assert f"warning: repository 'second': drill record '{failed.id}' fails authentication" in (
        damaged.stderr.replace("\n", " ")
    )
    # Read from the damaged repository alone, the drill is listed as unauthentic.
    alone = dk.run("drill", "list", "--repo", "second")
    assert alone.exit_code == 117
    row = next(line for line in alone.stdout.splitlines() if line.startswith(failed.id))
    assert row.split()[1:] == ["-"] * 7 + ["UNAUTHENTIC"]


def test_a_repository_that_cannot_take_the_record_is_a_warning(
    pg: PgCluster, workdir: Path
) -> None:
    dk = two_repos(pg, workdir)
    (workdir / "second").rename(workdir / "unmounted")
    record = make_record()

    copies = write_drill_record_everywhere(load_settings(dk.config), record)

    assert copies.ok and copies.written == ["local"]
    [warning] = copies.warnings
    assert isinstance(warning, DrillRecordNotWritten)
    assert f"drill record '{record.id}' was not written to repository 'second'" in warning.message
    listed = dk.run("drill", "list", "--json")
    assert listed.exit_code == 103, listed.output  # the unreadable repository's warning
    assert [d["id"] for d in json.loads(listed.stdout)["drills"]] == [record.id]


def test_info_shows_the_last_drill_per_repository(pg: PgCluster, workdir: Path) -> None:
    dk = two_repos(pg, workdir)
    label = json.loads(dk.ok("backup", "--type", "full", "--json").stdout)["label"]
    assert dk.info()["last_drill"] == {"local": None, "second": None}

    settings = load_settings(dk.config)
    older = make_record(datetime.now(UTC) - timedelta(hours=2), backup=label)
    newer = make_record(datetime.now(UTC), backup=label)
    write_drill_record_everywhere(settings, older)
    write_drill_record_everywhere(settings, newer)
    flip_a_byte(workdir / "second" / f"drills/{newer.id}/record")

    last = dk.info()["last_drill"]
    assert last["local"] == {
        "id": newer.id,
        "started_at": newer.started_at.isoformat(),
        "outcome": "PASS",
        "failure": None,
        "backup": label,
        "rto": {"target_seconds": 14400.0, "achieved_seconds": 38.2, "met": True},
        "rpo": {"target_seconds": 3600.0, "achieved_seconds": 12.0, "met": True},
    }
    assert last["second"]["id"] == older.id  # the newest there that authenticates

    text = dk.run("info").stdout
    started = newer.started_at.isoformat(timespec="seconds")
    assert (
        f"last drill in 'local': {newer.id} started {started}"
        f" PASS, RTO 38.2s/4h, RPO 12.0s/1h, backup {label}"
    ) in text
