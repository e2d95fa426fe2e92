"""Drills against real PostgreSQL: a long sandbox path, a random restore time, the pgbench check."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rig.archive import switch_wal, wait_archived
from rig.postgres import PgCluster
from test_drill import drill_setup, postgres_under, records, run_drill

from drkit.config.settings import load_settings
from drkit.drill.plan import choose_restore_point
from drkit.drill.scenario import RestorePointSpec
from drkit.pg.recovery import TargetKind
from drkit.pg.wal import format_lsn, parse_lsn, parse_segment_name, segment_name
from drkit.repo.open import open_repository
from drkit.repo.wal_archive import WalArchive

SEGMENT = 16 * 1024 * 1024


def segment_start(name: str) -> str:
    return format_lsn(parse_segment_name(name, SEGMENT)[1] * SEGMENT)


def short_socket_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("drkit-pg-")}


def test_a_long_sandbox_path_still_starts_the_copy(pg_factory: Any, workdir: Path) -> None:
    parent = workdir / ("sandbox-" + "x" * 50) / ("drills-" + "y" * 40)
    sandbox_root = parent / "drill-20261207-154500Z-abcd" / "run"
    assert len(str(sandbox_root / ".s.PGSQL.54321")) > 150  # beyond a unix socket's 107 bytes
    dk = drill_setup(pg_factory(15), workdir, sandbox=parent)
    before = short_socket_dirs()

    code, out, _ = run_drill(dk)

    record = out["record"]
    assert code == 0, record["reason"]
    assert record["outcome"] == "PASS" and record["wal_segments"] >= 1
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True}
    # Sandbox and the short socket directory are gone, and no server is left
    assert list(parent.iterdir()) == []
    assert short_socket_dirs() <= before
    assert postgres_under(parent) == []


def test_random_drills_a_random_instant_of_a_random_backups_archive(
    pg_factory: Any, workdir: Path
) -> None:
    pg = pg_factory(15)
    dk = drill_setup(pg, workdir)  # a backup, then rows archived after it
    for batch in range(3):  # a second backup, and more archived WAL after each
        if batch == 1:
            dk.ok("backup")
        first = 3000 + batch * 1000
        pg.psql(f"INSERT INTO orders SELECT g, 'b' FROM generate_series({first}, {first + 199}) g")
        wait_archived(pg, switch_wal(pg))
    repo = open_repository(load_settings(dk.config))
    manifests = {str(label): repo.load_manifest(label)[0] for label in repo.backups()}
    archive = WalArchive(repo)
    archive_end = archive.pushed_at(archive.last_segment(1) or "")
    last_start = parse_lsn(segment_start(archive.last_segment(1) or ""))

    plans = [choose_restore_point(repo, RestorePointSpec(random=True), "test") for _ in range(20)]

    for plan in plans:
        manifest = manifests[plan.backup or ""]
        assert plan.target.kind is TargetKind.LSN and plan.target.timeline == "current"
        # after the backup's end, never past the start of the last archived segment
        assert parse_lsn(manifest.stop_lsn) < parse_lsn(plan.target.value) <= last_start
        assert plan.time is not None and manifest.stop_time <= plan.time <= archive_end
        # the segment the target starts was the first one archived at or after the instant
        segment = segment_name(1, parse_lsn(plan.target.value) // SEGMENT, SEGMENT)
        assert archive.pushed_at(segment) >= plan.time
    assert len({p.target.value for p in plans}) > 1 and len({p.backup for p in plans}) == 2

    code, out, _ = run_drill(dk, "--random")

    record = out["record"]
    point = record["restore_point"]
    assert code == 0, record["reason"]
    assert point["target_kind"] == "lsn" and point["time"] is not None
    assert "to a random instant" in point["reason"] and point["target_value"] in point["reason"]
    # the copy recovered to the drawn point: not before it, and it opened (PASS)
    assert parse_lsn(record["rpo_detail"]["recovered_lsn"]) >= parse_lsn(point["target_value"])


def test_pgbench_check_measures_read_only_tps_against_the_floor(
    pg: PgCluster, workdir: Path
) -> None:
    pg.run_bin("pgbench", "-i", "-s", "1", "-q")
    bench = {"clients": 2, "seconds": 1, "min_tps": 1}
    dk = drill_setup(pg, workdir, checks={"amcheck": False, "pgbench": bench})

    code, out, _ = run_drill(dk)

    record = out["record"]
    assert code == 0, record["reason"]
    [check] = record["checks"]
    assert (check["name"], check["kind"], check["ok"]) == ("pgbench", "pgbench", True)
    assert check["value"] > 1 and 1 <= check["seconds"] < 30
    assert check["detail"] == f"pgbench -S, 2 clients, 1s: {check['value']:.0f} tps (floor 1)"
    assert records(dk)[-1].checks[0].value == check["value"]  # in the stored record too

    # A floor no copy reaches fails the drill as a failed check, with the figure
    scenario = workdir / "slow.toml"
    scenario.write_text(
        'name = "slow"\n[checks]\namcheck = false\n'
        "[checks.pgbench]\nclients = 1\nseconds = 1\nmin_tps = 1e12\n"
    )
    code, out, _ = run_drill(dk, "--scenario", str(scenario))
    record = out["record"]
    assert code == 31 and record["failure"] == "check-failed"
    assert record["reason"].startswith("check 'pgbench' failed: pgbench -S, 1 clients, 1s: ")
    assert record["reason"].endswith(" tps (floor 1e+12): below the floor")
    assert record["checks"][0]["value"] > 0


def test_pgbench_check_sessions_are_read_only(pg_factory: Any, workdir: Path) -> None:
    script = workdir / "writes.sql"
    script.write_text("INSERT INTO orders VALUES (-1, 'written by the check');\n")
    bench = {"clients": 1, "seconds": 1, "min_tps": 1, "script": script}
    dk = drill_setup(pg_factory(15), workdir, checks={"amcheck": False, "pgbench": bench})

    code, out, _ = run_drill(dk)

    record = out["record"]
    assert code == 31 and record["failure"] == "check-failed"
    [check] = record["checks"]
    assert check["ok"] is False and check["value"] is None
    assert check["detail"].startswith("pgbench -f writes.sql, 1 clients, 1s: exit ")
    assert "cannot execute INSERT in a read-only transaction" in check["detail"]
