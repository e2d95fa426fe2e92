"""Restore drills against real PostgreSQL: PASS and every kind of FAIL, RPO against the truth,
the sandbox's safety and its teardown (also on SIGTERM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgCluster, attach_cluster, chown_to_server_user, database_checksums
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.config.settings import load_settings
from drkit.drill.judge import judge, objective, rpo_seconds
from drkit.repo.drills import CheckResult, DrillRecord, FailureKind
from drkit.repo.open import open_repository


def drill_setup(
    pg: PgCluster,
    workdir: Path,
    extra_repos: list[dict[str, Any]] | None = None,
    escrow: Path | None = None,
    tablespace: bool = False,
    **drill: Any,
) -> Drkit:
    """A cluster archiving into a repository, a full backup, rows after it, all archived."""
    dk = Drkit(pg, workdir, extra_repos=extra_repos or [])
    dk.ok("init")
    sections: dict[str, Any] = {"drill": {"sandbox": workdir / "sandboxes", **drill}}
    if escrow is not None:
        keys = {"provider": "keyfile", "keyfile": dk.keyfile}
        sections["keys"] = {**keys, "escrow": {"public_key_file": escrow}}
    enable_archiving(pg, dk, sections=sections)
    pg.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, note text);"
        " INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 2000) g"
    )
    if tablespace:
        location = pg.make_tablespace_dir("archive")
        pg.psql(f"CREATE TABLESPACE archive LOCATION '{location}'")
        pg.psql(
            "CREATE TABLE old_orders TABLESPACE archive AS"
            " SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 500) g"
        )
    dk.ok("backup")
    pg.psql("INSERT INTO orders SELECT g, 'after' FROM generate_series(2001, 2500) g")
    wait_archived(pg, switch_wal(pg))
    return dk


def run_drill(dk: Drkit, *args: str) -> tuple[int, dict[str, Any], str]:
    result = dk.run("drill", "--json", *args)
    assert result.stdout.startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout), result.stderr


def records(dk: Drkit) -> list[DrillRecord]:
    repo = open_repository(load_settings(dk.config))
    return [e.record for e in repo.drill_records() if e.record is not None]


def postgres_under(root: Path) -> list[int]:
    """Pids of processes whose working directory is under ``root`` (a postmaster's is its
    data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(root)):
                found.append(int(entry.name))
    return found


def assert_cleaned_up(workdir: Path) -> None:
    sandboxes = workdir / "sandboxes"
    left = (
        [p for p in sandboxes.iterdir() if p.name != "queued-records"] if sandboxes.exists() else []
    )
    assert left == [], left
    left = postgres_under(sandboxes)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def write_scenario(workdir: Path, text: str) -> Path:
    path = workdir / "scenario.toml"
    path.write_text(text)
    return path


def test_drill_passes_and_restores_exactly_the_source(pg: PgCluster, workdir: Path) -> None:
    dk = drill_setup(pg, workdir, tablespace=True)
    source = database_checksums(pg)
    location = Path(
        pg.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'archive'")
    )
    production = sorted(str(p) for p in location.rglob("*"))

    code, out, _ = run_drill(dk, "--keep")

    record = out["record"]
    assert code == 0, record
    assert record["outcome"] == "PASS" and record["failure"] is None
    assert record["restore_point"]["target_kind"] == "latest"
    assert "newest backup" in record["restore_point"]["reason"]
    assert record["repository"] == "local" and out["written"] == ["local"]
    assert [p["name"] for p in record["phases"]] == [
        "plan",
        "restore",
        "wal-replay+start",
        "checks",
        "teardown",
    ]
    assert record["wal_segments"] >= 1
    assert record["pg_version"].startswith(str(pg.version))
    rto = sum(p["seconds"] for p in record["phases"] if p["name"] != "teardown")
    assert abs(record["rto"]["achieved_seconds"] - rto) < 0.5
    assert record["rto"]["met"] and record["rpo"]["met"]
    assert record["rpo_detail"]["source_lsn"] is not None
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True}
    assert "intact" in record["checks"][0]["detail"]

    # The kept copy holds exactly the source's rows, table by table
    sandbox = Path(out["sandbox"])
    assert sandbox.stat().st_mode & 0o777 == 0o700
    assert postgres_under(sandbox) == []
    # The tablespace was restored into the sandbox, production's location left alone
    (link,) = (sandbox / "pgdata" / "pg_tblspc").iterdir()
    assert link.readlink() == sandbox / "tablespaces" / link.name
    assert any((sandbox / "tablespaces" / link.name).rglob("PG_*"))
    assert sorted(str(p) for p in location.rglob("*")) == production
    copy = attach_cluster(sandbox / "pgdata", pg.version, workdir)
    copy.start()
    assert database_checksums(copy) == source
    copy.stop()

    listed = json.loads(dk.ok("drill", "list", "--json").stdout)["drills"]
    assert [(d["id"], d["record"]["outcome"], d["repositories"]) for d in listed] == [
        (record["id"], "PASS", ["local"])
    ]
    assert listed[0]["record"] == record
    last = dk.info()["last_drill"]["local"]
    assert (last["id"], last["outcome"], last["backup"]) == (
        record["id"],
        "PASS",
        record["restore_point"]["backup"],
    )


def test_text_output_names_the_point_phases_targets_and_checks(
    pg_factory: Any, workdir: Path
) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    result = dk.run("drill", "--rpo", "2h", "--started-by", "scheduler")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in (
        "restore point: backup ",
        "why: the newest backup and every archived WAL segment after it (default)",
        "wal-replay+start",
        "(not part of the RTO)",
        "(target 4h): met",
        "(target 2h): met",
        "ok   amcheck",
        "record written to: local",
    ):
        assert expected in out, out
    assert out.rstrip().endswith("PASS")
    assert [r.started_by for r in records(dk)] == ["scheduler"]
    assert_cleaned_up(workdir)


def test_rto_target_missed_fails_with_32(pg_factory: Any, workdir: Path) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    code, out, _ = run_drill(dk, "--rto", "1s")
    record = out["record"]
    assert code == 32
    assert (out["outcome"], out["failure"], out["reason"]) == (
        "FAIL",
        "target-missed",
        record["reason"],
    )
    assert record["outcome"] == "FAIL" and record["failure"] == "target-missed"
    assert record["reason"].startswith("RTO ") and "> target 1.0s" in record["reason"]
    assert record["rto"]["met"] is False and record["rpo"]["met"] is True
    assert [r.failure for r in records(dk)] == ["target-missed"]
    assert_cleaned_up(workdir)


def test_failing_sql_check_fails_with_31(pg_factory: Any, workdir: Path) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    scenario = write_scenario(
        workdir,
        """
name = "orders-check"
[checks]
amcheck = false
readable = true
[[checks.sql]]
name = "all orders"
query = "SELECT count(*) FROM orders"
expect = "2500"
[[checks.sql]]
name = "too many orders"
query = "SELECT count(*) FROM orders"
max = 100
""",
    )
    code, out, _ = run_drill(dk, "--scenario", str(scenario))
    record = out["record"]
    assert code == 31, record
    assert record["failure"] == "check-failed" and record["scenario"] == "orders-check"
    checks = {c["name"]: c for c in record["checks"]}
    assert checks["all orders"]["ok"] and checks["all orders"]["detail"] == "got '2500'"
    assert not checks["too many orders"]["ok"]
    assert checks["too many orders"]["detail"] == "got '2500': above the maximum 100"
    assert checks["readable"]["ok"] and "tables read" in checks["readable"]["detail"]
    assert record["reason"] == ("check 'too many orders' failed: got '2500': above the maximum 100")
    assert_cleaned_up(workdir)


def test_damaged_object_fails_with_30(pg_factory: Any, workdir: Path) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    data = sorted((dk.repo_path / "backup").rglob("data/*"), key=lambda p: p.stat().st_size)
    victim = data[-1]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    victim.write_bytes(bytes(blob))

    code, out, _ = run_drill(dk)
    record = out["record"]
    assert code == 30
    assert record["failure"] == "restore-failed"
    assert record["reason"].startswith("restore: ")
    assert "damaged" in record["reason"] or "authentication" in record["reason"]
    assert record["checks"] == [] and record["rto"]["achieved_seconds"] is None
    assert [r.failure for r in records(dk)] == ["restore-failed"]
    assert_cleaned_up(workdir)


def test_missing_wal_segment_fails_with_30(pg_factory: Any, workdir: Path) -> None:
    pg = pg_factory(15)
    dk = drill_setup(pg, workdir)
    names = [switch_wal(pg) for _ in range(3)]
    wait_archived(pg, names[-1])
    (dk.repo_path / "wal" / names[1][:8] / names[1]).unlink()

    code, out, _ = run_drill(dk)
    assert code == 30
    assert f"WAL segment '{names[1]}' is missing from the archive" in out["record"]["reason"]
    assert_cleaned_up(workdir)


def test_sandbox_inside_pgdata_unreachable_or_too_small_is_refused(
    pg_factory: Any, workdir: Path
) -> None:
    pg = pg_factory(15)
    dk = drill_setup(pg, workdir, sandbox=pg.pgdata / "drills")
    code, out, _ = run_drill(dk)
    assert code == 30
    assert out["record"]["reason"] == (
        f"sandbox: refusing the drill sandbox '{pg.pgdata / 'drills'}': it is inside"
        f" '{pg.pgdata}', which belongs to the source cluster"
    )
    assert not (pg.pgdata / "drills").exists()

    # A parent the server user cannot pass through is refused before anything is restored
    private = workdir / "private"
    private.mkdir(mode=0o700)
    sandboxes = private / "sandboxes"
    dk.write_config(
        archive={"async": False, "spool_path": workdir / "spool"}, drill={"sandbox": sandboxes}
    )
    code, out, _ = run_drill(dk)
    assert code == 30
    assert out["record"]["reason"].startswith(
        f"sandbox: the drill's server user (postgres) cannot reach the sandbox in '{sandboxes}':"
        f" '{private}' does not let it pass (mode 700, owner root)"
    )
    assert list(sandboxes.iterdir()) == []

    # A file system without room for the restored copy is refused before anything is written
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        dk.write_config(
            archive={"async": False, "spool_path": workdir / "spool"}, drill={"sandbox": small}
        )
        code, out, _ = run_drill(dk)
        assert code == 30
        assert out["record"]["reason"].startswith(
            f"sandbox: not enough space for the drill sandbox in '{small}': the restored copy"
            " needs about "
        )
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_sigterm_stops_the_server_and_removes_the_sandbox(pg_factory: Any, workdir: Path) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    scenario = write_scenario(
        workdir,
        """
name = "slow"
[checks]
amcheck = false
[[checks.sql]]
name = "slow"
query = "SELECT pg_sleep(60)"
""",
    )
    proc = dk.spawn("drill", "--scenario", str(scenario))
    try:
        sandboxes = workdir / "sandboxes"
        deadline = time.monotonic() + 60
        while not any(
            (p / "pgdata" / "postmaster.pid").exists() for p in sandboxes.glob("drill-*")
        ) or not postgres_under(sandboxes):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the drill's server never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "drill interrupted by SIGTERM" in stderr
    assert_cleaned_up(workdir)


def test_rpo_is_the_time_since_the_last_archived_commit(pg_factory: Any, workdir: Path) -> None:
    pg = pg_factory(15)
    dk = drill_setup(pg, workdir)
    dk.ok("heartbeat", "--once")
    last_archived = float(pg.psql("SELECT extract(epoch FROM at) FROM drkit_heartbeat"))
    wait_archived(pg, switch_wal(pg))

    # Archiving stops: what is written from now on would be lost
    pg.set_conf({"archive_command": "false"})
    pg.reload()
    pg.psql("INSERT INTO orders SELECT g, 'lost' FROM generate_series(3001, 3100) g")
    dk.ok("heartbeat", "--once")
    # a beat an hour ahead, never archived: a drill that counted it would report no loss at all
    pg.psql("UPDATE drkit_heartbeat SET at = at + interval '1 hour'")

    code, out, _ = run_drill(dk)
    record = out["record"]
    assert code == 0, record
    started = datetime.fromisoformat(record["started_at"]).timestamp()
    truth = started - last_archived
    assert abs(record["rpo"]["achieved_seconds"] - truth) <= 2, (record["rpo"], truth)
    detail = record["rpo_detail"]
    assert detail["method"] == "heartbeat"
    recovered = datetime.fromisoformat(detail["recovered_time"]).timestamp()
    assert abs(recovered - last_archived) < 1
    assert detail["lost_bytes"] > 0 and detail["source_lsn"] != detail["recovered_lsn"]
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True, "heartbeat": True}
    exposure = {e["repo"]: e for e in record["exposure"]}
    assert exposure["local"]["newest_wal"] is not None


def test_site_loss_restores_from_the_offsite_copy_alone(pg_factory: Any, workdir: Path) -> None:
    offsite = workdir / "offsite"
    dk = drill_setup(
        pg_factory(15),
        workdir,
        extra_repos=[{"name": "offsite", "path": offsite, "offsite": True}],
    )
    dk.ok("replicate")
    chown_to_server_user(offsite, recursive=True)  # wal-fetch runs as the server user
    shutil.rmtree(dk.repo_path)  # the site is lost
    scenario = write_scenario(workdir, 'name = "site-loss"\n[survivors]\noffsite_only = true\n')

    code, out, stderr = run_drill(dk, "--scenario", str(scenario))

    record = out["record"]
    assert record["outcome"] == "PASS", record
    assert record["repository"] == "offsite" and record["repositories_allowed"] == ["offsite"]
    assert record["wal_segments"] >= 1
    assert out["written"] == ["offsite"]
    assert "was not written to repository 'local'" in stderr
    assert code == 114  # the record is missing from one repository: a warning
    assert_cleaned_up(workdir)

    # Without the scenario the restore reads from the offsite copy, but the copy's
    # restore_command asks the lost primary too, and wal-fetch never takes a repository that is
    # not there for "not archived": the drill shows that this restore needs the scenario
    code, out, _ = run_drill(dk)
    record = out["record"]
    assert code == 30 and record["repository"] == "offsite"
    assert record["repositories_allowed"] == ["local", "offsite"]
    assert record["reason"].startswith("start: ")
    assert "could not restore file" in record["reason"] and "exit code 222" in record["reason"]
    assert_cleaned_up(workdir)


def test_scenario_naming_an_unknown_repository_is_an_error(pg_factory: Any, workdir: Path) -> None:
    dk = drill_setup(pg_factory(15), workdir)
    scenario = write_scenario(workdir, 'name = "x"\n[survivors]\nrepos = ["nope"]\n')
    result = dk.run("drill", "--scenario", str(scenario))
    assert result.exit_code == 3, result.output
    assert "the scenario names repositories that are not configured: nope" in result.stderr
    assert records(dk) == []


def test_key_loss_restores_with_the_escrow_key_alone(pg_factory: Any, workdir: Path) -> None:
    offline = workdir / "offline"
    offline.mkdir()
    made = CliRunner().invoke(app, ["keys", "escrow-init", "--out", str(offline / "recovery")])
    assert made.exit_code == 0, made.output
    recovery = offline / "recovery.key"
    # The recovery key stays the drill host's alone (root's, 0600): the sandbox's server never
    # reads it, it replays WAL with the period keys the restore handed over
    assert recovery.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(recovery.stat().st_mode) == 0o600
    dk = drill_setup(pg_factory(15), workdir, escrow=offline / "recovery.pub")
    assert dk.keyfile is not None
    dk.keyfile.rename(workdir / "lost.key")  # the key provider is gone
    scenario = write_scenario(
        workdir,
        f'name = "key-loss"\n[survivors]\nvault = false\nrecovery_key = "{recovery}"\n',
    )

    code, out, stderr = run_drill(dk, "--scenario", str(scenario), "--keep")

    record = out["record"]
    assert record["outcome"] == "PASS", record
    assert record["wal_segments"] >= 1  # WAL replayed past the backup, with escrowed keys
    sandbox = Path(out["sandbox"])
    settings = (sandbox / "pgdata" / "postgresql.auto.conf").read_text()
    assert "--wal-keys drkit-wal-keys.json %f %p'" in settings
    assert "--recovery-key" not in settings and str(recovery) not in settings
    assert "recovery_end_command = 'rm -f drkit-wal-keys.json'" in settings
    assert not (sandbox / "pgdata" / "drkit-wal-keys.json").exists()  # removed at promotion
    shutil.rmtree(sandbox)
    assert {c["name"]: c["ok"] for c in record["checks"]} == {"amcheck": True}
    # The record is sealed with the configured provider afterwards, which is gone too: it
    # waits in this host's queue (tests/test_drill_points.py: written once the provider is back)
    assert out["written"] == [] and code == 114
    assert out["queued"] == str(workdir / "sandboxes" / "queued-records" / f"{record['id']}.json")
    assert "was not written (it cannot be sealed: " in stderr and "lost.key" not in stderr
    assert_cleaned_up(workdir)


def test_judge_orders_failures_restore_then_checks_then_targets() -> None:
    rto, rpo = objective(timedelta(seconds=1), 5.0), objective(timedelta(hours=1), 10.0)
    bad = CheckResult(name="orders", kind="sql", ok=False, detail="got '0'")
    good = CheckResult(name="amcheck", kind="amcheck", ok=True)

    restore = judge(
        restore_failure=(FailureKind.RESTORE_FAILED, "restore: damaged"),
        checks=[bad],
        rto=rto,
        rpo=rpo,
    )
    assert (restore.failure, restore.reason) == (FailureKind.RESTORE_FAILED, "restore: damaged")
    check = judge(restore_failure=None, checks=[good, bad], rto=rto, rpo=rpo)
    assert (check.failure, check.reason) == (
        FailureKind.CHECK_FAILED,
        "check 'orders' failed: got '0'",
    )
    target = judge(restore_failure=None, checks=[good], rto=rto, rpo=rpo)
    assert (target.failure, target.reason) == (FailureKind.TARGET_MISSED, "RTO 5.0s > target 1.0s")
    passed = judge(
        restore_failure=None, checks=[good], rto=objective(None, 5.0), rpo=objective(None, None)
    )
    assert (passed.failure, passed.reason, passed.rto.met, passed.rpo.met) == (None, "", None, None)
    now = datetime.now(UTC)
    assert rpo_seconds(now, now + timedelta(seconds=3)) == 0.0
    assert rpo_seconds(now, now - timedelta(seconds=3)) == 3.0
    assert rpo_seconds(now, None) is None


def test_ransomware_restores_from_the_locked_copy_alone(
    pg_factory: Any, workdir: Path, s3: Any, new_bucket: Any
) -> None:
    bucket = new_bucket("drkit-drill", object_lock=True)  # its env: the sandbox's wal-fetch too
    locked = {
        "name": "s3-locked",
        "type": "s3",
        "bucket": bucket,
        "endpoint_url": s3.endpoint_url,
        "region": "us-east-1",
        "offsite": True,
        "object_lock": {"mode": "GOVERNANCE", "days": 1},
    }
    dk = drill_setup(pg_factory(15), workdir, extra_repos=[locked])
    dk.ok("replicate")
    # The attacker encrypted the local repository's data and deleted its WAL
    for data in (dk.repo_path / "backup").rglob("data/*"):
        data.write_bytes(b"encrypted by ransomware")
    shutil.rmtree(dk.repo_path / "wal")
    scenario = write_scenario(
        workdir, 'name = "ransomware"\n[survivors]\nobject_lock_only = true\n'
    )

    code, out, _ = run_drill(dk, "--scenario", str(scenario))

    record = out["record"]
    assert code == 0, record
    assert record["repository"] == "s3-locked"
    assert record["repositories_allowed"] == ["s3-locked"]
    assert record["wal_segments"] >= 1
    assert out["written"] == ["local", "s3-locked"]
    assert_cleaned_up(workdir)


def test_named_restore_point_and_random_backup(pg_factory: Any, workdir: Path) -> None:
    pg = pg_factory(15)
    dk = drill_setup(pg, workdir)
    pg.psql("SELECT pg_create_restore_point('before_cleanup')")
    pg.psql("DELETE FROM orders WHERE id > 100")  # the bad migration
    wait_archived(pg, switch_wal(pg))
    scenario = write_scenario(
        workdir,
        """
name = "bad-migration"
[checks]
amcheck = false
[[checks.sql]]
name = "orders before the cleanup"
query = "SELECT count(*) FROM orders"
expect = "2500"
""",
    )

    code, out, _ = run_drill(dk, "--scenario", str(scenario), "--target-name", "before_cleanup")
    point = out["record"]["restore_point"]
    assert code == 0, out["record"]["reason"]
    assert (point["target_kind"], point["target_value"]) == ("name", "before_cleanup")
    assert point["reason"] == "recovery target name 'before_cleanup' (requested)"

    code, out, _ = run_drill(dk, "--random")
    point = out["record"]["restore_point"]
    assert code == 0, out["record"]["reason"]
    assert point["target_kind"] == "lsn" and point["time"] is not None
    assert point["reason"].startswith("random backup (requested), one of 1, to a random instant")
    assert out["record"]["rpo_detail"]["method"] in ("last-commit", "backup-end")
    assert_cleaned_up(workdir)
