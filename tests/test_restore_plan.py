"""`drkit restore --plan`: the chain, the WAL range, the bytes to fetch and the expected duration
from past drills, without writing anything."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgFactory
from test_drill_records import make_record

from drkit.config.settings import load_settings
from drkit.pg.wal import parse_segment_name
from drkit.repo.drills import DrillRecord, FailureKind, Phase
from drkit.repo.open import open_repository
from drkit.restore.prediction import MAX_DRILLS, restore_rates

MB = 1_000_000


def drill(
    when: datetime,
    restored: int,
    restore_s: float,
    segments: int,
    start_s: float,
    repository: str = "local",
) -> DrillRecord:
    return make_record(when).model_copy(
        update={
            "repository": repository,
            "restored_bytes": restored,
            "wal_segments": segments,
            "phases": [
                Phase(name="plan", seconds=0.1),
                Phase(name="restore", seconds=restore_s),
                Phase(name="wal-replay+start", seconds=start_s),
                Phase(name="checks", seconds=2.0),
                Phase(name="teardown", seconds=0.3),
            ],
        }
    )


def test_plan_predicts_from_the_recorded_drills_and_writes_nothing(
    pg_factory: PgFactory, workdir: Path
) -> None:
    pg = pg_factory(15)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    pg.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g")
    label = json.loads(dk.ok("backup", "--json").stdout)["label"]
    for _ in range(2):
        last = switch_wal(pg)
    wait_archived(pg, last)
    repo = open_repository(load_settings(dk.config))
    manifest, _ = repo.load_manifest(repo.resolve(label))
    stored = sum(p.stat().st_size for p in (dk.repo_path / "backup" / label).rglob("data/*"))

    # No drill yet: the plan has no expected duration, and says how to get one
    before = dk.repo_listing()
    plan = json.loads(dk.ok("restore", "--plan", "--json").stdout)
    assert plan["label"] == label and plan["chain"] == [label] and plan["repo"] == "local"
    assert plan["wal"] == {
        "first": manifest.start_wal,
        "last": manifest.stop_wal,
        "fetched_segments": 0,
        "upper_bound": False,
    }
    assert plan["restore_bytes"] == manifest.stats.size
    assert plan["fetch_bytes"] == stored
    assert plan["prediction"] is None
    assert "no drill has restored a copy yet" in dk.ok("restore", "--plan").stdout

    # Three drills on a line: 10 MB/s, and 1 s to start plus 0.5 s per WAL segment; a failed
    # restore and an older drill from another repository do not count
    now = datetime.now(UTC)
    for record in (
        drill(now - timedelta(hours=5), 100 * MB, 10.0, 2, 2.0),
        drill(now - timedelta(hours=4), 200 * MB, 20.0, 4, 3.0),
        drill(now - timedelta(hours=3), 300 * MB, 30.0, 6, 4.0),
        drill(now - timedelta(hours=2), 1 * MB, 999.0, 1, 999.0).model_copy(
            update={"failure": FailureKind.RESTORE_FAILED}
        ),
        drill(now - timedelta(hours=1), 1 * MB, 999.0, 1, 999.0, repository="elsewhere"),
    ):
        repo.write_drill_record(record)
    before = dk.repo_listing()

    plan = json.loads(dk.ok("restore", "--plan", "--target-latest", "--json").stdout)
    size = manifest.wal_segment_size
    first = parse_segment_name(manifest.start_wal, size)[1]
    newest = parse_segment_name(last, size)[1]
    assert plan["wal"]["first"] == manifest.start_wal and plan["wal"]["last"] == last
    assert plan["wal"]["fetched_segments"] == newest - first + 1
    prediction = plan["prediction"]
    assert prediction["based_on_drills"] == 3
    assert prediction["rates"]["repository"] == "local"
    assert prediction["rates"]["bytes_per_second"] == pytest.approx(10 * MB)
    assert prediction["rates"]["start_seconds"] == pytest.approx(1.0)
    assert prediction["rates"]["seconds_per_segment"] == pytest.approx(0.5)
    restore_s = manifest.stats.size / (10 * MB)
    replay_s = 1.0 + 0.5 * (newest - first + 1)
    assert prediction["restore_seconds"] == pytest.approx(restore_s, abs=1e-3)
    assert prediction["replay_seconds"] == pytest.approx(replay_s, abs=1e-3)
    assert prediction["seconds"] == pytest.approx(restore_s + replay_s, abs=1e-3)

    text = dk.ok("restore", "--plan", "--target-latest").stdout
    assert f"restore plan: backup {label} from 'local' (nothing written)" in text
    assert f"chain: {label}" in text
    assert f"WAL: {manifest.start_wal} .. {last} ({newest - first + 1} segments" in text
    assert "based on 3 drills from 'local': 9.5 MiB/s, 1.00s start + 0.50s per WAL segment" in text

    # Nothing was written: no data directory, the repository as it was
    assert dk.repo_listing() == before


def test_plan_refuses_what_the_restore_would_refuse(pg_factory: PgFactory, workdir: Path) -> None:
    pg = pg_factory(15)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    dk.ok("backup")
    result = dk.run("restore", "--plan", "--target-time", "2000-01-01 00:00:00+00")
    assert result.exit_code == 16, result.output
    assert "is before the end of the oldest backup" in result.stderr
    missing = dk.run("restore")
    assert missing.exit_code == 2 and "give --pgdata DIR" in missing.stderr


def test_rates_with_one_segment_count_or_none() -> None:
    now = datetime.now(UTC)
    same = [drill(now - timedelta(hours=i), 50 * MB, 5.0, 3, 3.0) for i in range(3)]
    rates = restore_rates(same, "local")
    assert rates is not None and rates.drills == 3
    assert (rates.start_seconds, rates.seconds_per_segment) == (0.0, 1.0)
    assert rates.predict(100 * MB, 6).seconds == pytest.approx(10.0 + 6.0)

    immediate = [drill(now - timedelta(hours=i), 50 * MB, 5.0, 0, 1.5) for i in range(2)]
    rates = restore_rates(immediate, "local")
    assert rates is not None
    assert (rates.start_seconds, rates.seconds_per_segment) == (1.5, 0.0)
    assert restore_rates([], "local") is None


def test_rates_prefer_the_repository_and_the_newest_drills() -> None:
    now = datetime.now(UTC)
    old_local = [
        drill(now - timedelta(days=30 + i), 10 * MB, 10.0, 1, 1.0) for i in range(MAX_DRILLS)
    ]
    new_local = [drill(now - timedelta(days=i), 40 * MB, 10.0, 1, 1.0) for i in range(MAX_DRILLS)]
    s3 = [drill(now, 1 * MB, 10.0, 1, 1.0, repository="s3")]
    rates = restore_rates([*old_local, *new_local, *s3], "local")
    assert rates is not None and rates.drills == MAX_DRILLS
    assert rates.bytes_per_second == pytest.approx(4 * MB)  # the newest ten only
    other = restore_rates([*old_local, *s3], "nowhere")
    assert other is not None and other.repository is None and other.drills == MAX_DRILLS


def test_a_drill_records_the_plans_prediction(pg_factory: PgFactory, workdir: Path) -> None:
    pg = pg_factory(15)
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk, sections={"drill": {"sandbox": workdir / "sandboxes"}})
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
    dk.ok("backup")
    wait_archived(pg, switch_wal(pg))

    first = json.loads(dk.run("drill", "--json").stdout)["record"]
    assert first["outcome"] == "PASS" and first["predicted_seconds"] is None

    plan = json.loads(dk.ok("restore", "--plan", "--target-latest", "--json").stdout)
    prediction = plan["prediction"]
    assert prediction["based_on_drills"] == 1
    phases = {p["name"]: p["seconds"] for p in first["phases"]}
    assert prediction["restore_seconds"] == pytest.approx(phases["restore"], rel=0.01)
    assert plan["wal"]["fetched_segments"] == first["wal_segments"]
    assert prediction["replay_seconds"] == pytest.approx(phases["wal-replay+start"], rel=0.01)

    second = dk.run("drill")
    assert second.exit_code == 0, second.output
    assert f"predicted by 'restore --plan': {prediction['seconds']:.1f}s until promoted" in (
        second.stdout
    )
    records = open_repository(load_settings(dk.config)).drill_records()
    predicted = [e.record.predicted_seconds for e in records if e.record is not None]
    assert predicted[0] is None and predicted[1] == pytest.approx(prediction["seconds"], abs=1e-3)
