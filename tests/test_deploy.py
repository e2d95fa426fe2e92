"""The systemd units in systemd/: systemd accepts every one, and every ExecStart line, as written,
does what its unit promises against a real cluster (run as the unit's User=)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rig.archive import enable_archiving, switch_wal, wait_archived
from rig.drkit import Drkit
from rig.postgres import PgFactory, chown_to_server_user

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS = REPO_ROOT / "systemd"
NOTIFY_SCRIPT = UNITS / "drkit-notify"
DRKIT_BIN = Path(sys.executable).parent / "drkit"
INSTALLED_DRKIT = "/usr/local/bin/drkit"  # where the units expect drkit (docs/scheduling.md)
INSTALLED_NOTIFY = "/usr/local/libexec/drkit-notify"
INSTANCE = "main"

JOB_UNITS = sorted(p.name for p in UNITS.glob("drkit-*@.timer"))
SERVICE_UNITS = sorted(p.name for p in UNITS.glob("drkit-*@.service"))
HARDENING = {
    "User": "postgres",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
}
# Writable under ProtectSystem=strict: PGDATA's parent and ~postgres/.drkit; repository, sandboxes.
WRITABLE = {"-/var/lib/postgresql", "-/var/lib/drkit"}


def unit_entries(name: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` of a unit file (comments and blanks skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(name: str, section: str, key: str) -> str:
    values = unit_entries(name)[section][key]
    assert len(values) == 1, f"{name}: {key}= given {len(values)} times"
    return values[0]


# -- systemd accepts every unit --------------------------------------------------------------------


def install_units(target: Path) -> None:
    """Copy the units to ``target`` with the binaries pointing at this checkout (the only
    change: systemd-analyze checks that every ExecStart binary exists and is executable)."""
    target.mkdir()
    for path in UNITS.glob("drkit-*@.*"):
        text = path.read_text().replace(INSTALLED_DRKIT, str(DRKIT_BIN))
        (target / path.name).write_text(text.replace(INSTALLED_NOTIFY, str(NOTIFY_SCRIPT)))


def systemd_analyze_verify(unit_dir: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}  # trailing ':' adds the defaults
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        env=env,
        cwd=unit_dir,
        check=False,
    )


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    install_units(tmp_path / "units")
    instances = [n.replace("@.", f"@{INSTANCE}.") for n in (*SERVICE_UNITS, *JOB_UNITS)]
    instances.remove(f"drkit-notify@{INSTANCE}.service")
    instances.append(f"drkit-notify@drkit-backup-full@{INSTANCE}.service.service")

    result = systemd_analyze_verify(tmp_path / "units", instances)

    # Unknown keys and bad values are only warnings for systemd: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    assert len(instances) == 21


def test_systemd_analyze_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    """The check above is not vacuous: the same call rejects a unit whose binary is absent."""
    install_units(tmp_path / "units")
    unit = tmp_path / "units" / "drkit-prune@.service"
    unit.write_text(unit.read_text().replace(str(DRKIT_BIN), "/nonexistent/drkit"))

    result = systemd_analyze_verify(tmp_path / "units", [f"drkit-prune@{INSTANCE}.service"])

    assert result.returncode != 0
    assert "/nonexistent/drkit is not executable" in result.stderr


@pytest.mark.parametrize("name", SERVICE_UNITS)
def test_every_service_is_rated_ok_by_systemd_analyze_security(tmp_path: Path, name: str) -> None:
    """systemd's own exposure score (0 = locked down, 10 = unprotected) stays in its "OK" band:
    removing a protection from a unit fails here."""
    install_units(tmp_path / "units")
    instance = name.replace("@.", f"@{INSTANCE}.")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path / 'units'}:"}
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=35", "--no-pager", instance],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path / "units",
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    [verdict] = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert " OK " in verdict, verdict


def test_every_timer_starts_its_service_persistently_with_a_random_delay() -> None:
    for timer in JOB_UNITS:
        service = timer.replace(".timer", ".service")
        assert (UNITS / service).is_file(), f"{timer} has no {service}"
        timer_section = unit_entries(timer)["Timer"]
        assert timer_section["Persistent"] == ["true"], timer
        assert timer_section["RandomizedDelaySec"][0], timer
        assert unit_entries(timer)["Install"]["WantedBy"] == ["timers.target"], timer
        assert one(service, "Service", "Type") == "oneshot"


@pytest.mark.parametrize("name", [n for n in SERVICE_UNITS if n != "drkit-notify@.service"])
def test_every_drkit_unit_is_hardened_runs_as_postgres_and_reports_failure(name: str) -> None:
    for key, value in HARDENING.items():
        assert one(name, "Service", key) == value, f"{name}: {key}"
    assert set(one(name, "Service", "ReadWritePaths").split()) >= WRITABLE
    assert one(name, "Unit", "OnFailure") == "drkit-notify@%n.service"
    argv = shlex.split(one(name, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_DRKIT and argv[-2:] == ["--config", "%E/drkit/%i.toml"]


def test_calendar_expressions_parse_and_backups_do_not_collide() -> None:
    """A full or diff (01:00 plus at most 30 min of delay) never meets an incremental."""
    calendars = {t: one(t, "Timer", "OnCalendar") for t in JOB_UNITS}
    result = subprocess.run(
        ["systemd-analyze", "calendar", "--iterations=48", calendars["drkit-backup-incr@.timer"]],
        capture_output=True,
        text=True,
        check=True,
    )
    hours = {
        int(line.split()[-2].split(":")[0])
        for line in result.stdout.splitlines()
        if "Iter." in line or "Next elapse" in line
    }
    assert hours == {0, *range(4, 24)}
    for timer, expression in calendars.items():
        check = subprocess.run(
            ["systemd-analyze", "calendar", expression], capture_output=True, text=True
        )
        assert check.returncode == 0, f"{timer}: {check.stderr}"


# -- every ExecStart line runs ---------------------------------------------------------------------


def exec_start(name: str, config_dir: Path) -> list[str]:
    """The unit's ExecStart as systemd would run it: specifiers expanded (%E, /etc, is
    ``config_dir``; %S, /var/lib, is ``var/lib`` next to it), the drkit binary of this checkout
    in place of the installed one. Nothing else is changed."""
    line = one(name, "Service", "ExecStart").replace("%E", str(config_dir))
    line = line.replace("%S", str(config_dir.parent / "var" / "lib"))
    argv = shlex.split(line.replace("%i", INSTANCE))
    assert argv[0] == INSTALLED_DRKIT
    return [str(DRKIT_BIN), *argv[1:]]


def unit_environment(name: str) -> dict[str, str]:
    """The environment systemd gives the unit's process (User= and Environment= applied)."""
    user = pwd.getpwnam(one(name, "Service", "User"))
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "LANG": "C.UTF-8",
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
    }
    for assignment in unit_entries(name)["Service"].get("Environment", []):
        for item in shlex.split(assignment):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def unit_process(name: str, config_dir: Path) -> dict[str, Any]:
    """Popen arguments that start the unit's ExecStart the way systemd does: exec'd directly as
    User= and Group= with the user's groups, in the unit's environment."""
    user = pwd.getpwnam(one(name, "Service", "User"))
    group = grp.getgrnam(one(name, "Service", "Group")).gr_gid
    return {
        "args": exec_start(name, config_dir),
        "user": user.pw_uid,
        "group": group,
        "extra_groups": os.getgrouplist(user.pw_name, group),
        "env": unit_environment(name),
        "cwd": "/",
        "text": True,
    }


def run_unit(name: str, config_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        **unit_process(name, config_dir), capture_output=True, timeout=300, check=False
    )


@pytest.fixture
def instance(pg_factory: PgFactory, workdir: Path) -> Iterator[tuple[Drkit, Path]]:
    """An initialised drkit for a PostgreSQL 15 cluster, its configuration installed as the
    instance ``main`` (``<config_dir>/drkit/main.toml``), everything the postgres user's."""
    cluster = pg_factory(15)
    second = {"name": "second", "path": workdir / "second", "media": "tape", "offsite": True}
    dk = Drkit(cluster, workdir, extra_repos=[second])
    dk.write_config(retention={"full": 1})
    dk.ok("init")
    yield dk, install_instance(dk)


def install_instance(dk: Drkit) -> Path:
    """Install ``dk``'s configuration as instance ``main`` of a file system rooted in its
    workdir, all of it the postgres user's; returns the stand-in for /etc."""
    config_dir = dk.workdir / "etc"
    (config_dir / "drkit").mkdir(parents=True)
    shutil.copy(dk.config, config_dir / "drkit" / f"{INSTANCE}.toml")
    chown_to_server_user(dk.workdir, recursive=True)
    return config_dir


def ran(result: subprocess.CompletedProcess[str], name: str) -> None:
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr}"


def test_backup_units_take_the_backup_their_name_says(instance: tuple[Drkit, Path]) -> None:
    dk, config_dir = instance
    for kind in ("full", "diff", "incr"):
        name = f"drkit-backup-{kind}@.service"
        ran(run_unit(name, config_dir), name)

    backups = dk.info()["backups"]
    assert [b["type"] for b in backups] == ["full", "diff", "incr"]
    assert all(p.owner() == "postgres" for p in dk.repo_path.rglob("*"))


def test_replicate_verify_and_prune_units_do_their_job(instance: tuple[Drkit, Path]) -> None:
    dk, config_dir = instance
    ran(run_unit("drkit-backup-full@.service", config_dir), "full")
    ran(run_unit("drkit-backup-full@.service", config_dir), "second full")
    first, newest = (b["label"] for b in dk.info()["backups"])

    ran(run_unit("drkit-replicate@.service", config_dir), "replicate")
    copied = json.loads(dk.ok("info", "--json", "--repo", "second").stdout)["backups"]
    assert [b["label"] for b in copied] == [first, newest]

    verify = run_unit("drkit-verify@.service", config_dir)
    ran(verify, "verify")
    assert first in verify.stdout and newest in verify.stdout

    ran(run_unit("drkit-prune@.service", config_dir), "prune")  # [retention] full = 1
    assert [b["label"] for b in dk.info()["backups"]] == [newest]


def test_metrics_unit_writes_the_textfile_node_exporter_reads(
    instance: tuple[Drkit, Path],
) -> None:
    _, config_dir = instance
    ran(run_unit("drkit-backup-full@.service", config_dir), "full")
    collector = config_dir.parent / "var" / "lib" / "prometheus" / "node-exporter"
    collector.mkdir(parents=True)
    chown_to_server_user(collector)

    ran(run_unit("drkit-metrics@.service", config_dir), "metrics")

    textfile = collector / f"drkit-{INSTANCE}.prom"
    families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    ages = {s.labels["repo"]: s.value for s in families["drkit_backup_newest_age_seconds"].samples}
    assert 0 <= ages["local"] < 300
    jobs = {s.labels["job"] for s in families["drkit_job_last_success_timestamp_seconds"].samples}
    assert "full" in jobs
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert [p.name for p in collector.iterdir()] == [textfile.name]  # no temporary file left


def test_drill_unit_proves_the_newest_backup_restores(pg_factory: PgFactory, workdir: Path) -> None:
    cluster = pg_factory(15)
    dk = Drkit(cluster, workdir)
    dk.ok("init")
    enable_archiving(cluster, dk, sections={"drill": {"sandbox": workdir / "sandboxes"}})
    cluster.psql("CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 1000) g")
    dk.ok("backup")
    wait_archived(cluster, switch_wal(cluster))
    config_dir = install_instance(dk)

    result = run_unit("drkit-drill@.service", config_dir)

    ran(result, "drill")
    [drill] = json.loads(dk.ok("drill", "list", "--json").stdout)["drills"]
    record = drill["record"]
    assert drill["authentic"] and record["outcome"] == "PASS", record
    assert record["started_by"] == "scheduler"
    assert record["restore_point"]["backup"] == dk.info()["backups"][0]["label"]
    assert not any((workdir / "sandboxes").iterdir())  # the sandbox is gone


def test_report_unit_writes_the_quarters_report(instance: tuple[Drkit, Path]) -> None:
    dk, config_dir = instance
    ran(run_unit("drkit-backup-full@.service", config_dir), "full")

    result = run_unit("drkit-report@.service", config_dir)

    ran(result, "report")
    reports = config_dir.parent / "var" / "lib" / "drkit" / "reports" / INSTANCE
    now = datetime.now(UTC)
    quarter = f"{now.year}Q{(now.month - 1) // 3 + 1}"
    assert sorted(p.name for p in reports.iterdir()) == [
        f"drkit-report-{quarter}.html",
        f"drkit-report-{quarter}.json",
    ]
    report = json.loads((reports / f"drkit-report-{quarter}.json").read_text())
    assert dk.info()["backups"][0]["label"] in json.dumps(report)
    assert all(p.owner() == "postgres" for p in reports.iterdir())


def test_heartbeat_unit_keeps_its_row_and_stops_on_systemds_signal(
    instance: tuple[Drkit, Path],
) -> None:
    dk, config_dir = instance
    name = "drkit-heartbeat@.service"
    assert one(name, "Service", "Restart") == "always"
    proc = subprocess.Popen(
        **unit_process(name, config_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        query = "SELECT count(*) FROM pg_tables WHERE tablename = 'drkit_heartbeat'"
        while dk.cluster.psql(query) != "1":
            assert time.monotonic() < deadline, "no heartbeat table after 30 s"
            time.sleep(0.1)
        assert dk.cluster.psql("SELECT id FROM public.drkit_heartbeat") == "1"
    finally:
        proc.send_signal(signal.SIGTERM)  # systemd's KillSignal= default
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "beats" in out


def test_scheduler_unit_runs_its_jobs_and_stops_on_systemds_signal(
    instance: tuple[Drkit, Path],
) -> None:
    dk, config_dir = instance
    name = "drkit-scheduler@.service"
    config = config_dir / "drkit" / f"{INSTANCE}.toml"
    config.write_text(
        config.read_text()
        + '[schedule]\nfull = "*/2 * * * * *"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    proc = subprocess.Popen(
        **unit_process(name, config_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not dk.info()["backups"]:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no backup from the scheduler after 60 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)  # systemd's KillSignal=
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert all(p.owner() == "postgres" for p in dk.repo_path.rglob("*"))


# -- the failure hook ------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[tuple[dict[str, str], dict[str, Any]]]]]:
    received: list[tuple[dict[str, str], dict[str, Any]]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def notify(unit: str, **env: str) -> subprocess.CompletedProcess[str]:
    """drkit-notify@<unit>.service's ExecStart, with the variables systemd sets for OnFailure=."""
    argv = shlex.split(one("drkit-notify@.service", "Service", "ExecStart").replace("%i", unit))
    assert argv[0] == INSTALLED_NOTIFY
    monitor = {
        "MONITOR_SERVICE_RESULT": "exit-code",
        "MONITOR_EXIT_CODE": "exited",
        "MONITOR_EXIT_STATUS": "5",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [str(NOTIFY_SCRIPT), *argv[1:]],
        capture_output=True,
        text=True,
        env={**monitor, **env},
        timeout=60,
        check=False,
    )


def test_notify_posts_the_failed_unit_to_the_webhook(
    webhook: tuple[str, list[tuple[dict[str, str], dict[str, Any]]]],
) -> None:
    url, received = webhook
    unit = f"drkit-backup-incr@{INSTANCE}.service"

    result = notify(unit, NOTIFY_URL=url, NOTIFY_TOKEN="s3cret-token")

    assert result.returncode == 0, result.stderr
    assert f"{unit} failed on " in result.stdout and "s3cret" not in result.stdout
    [(headers, body)] = received
    assert headers["Authorization"] == "Bearer s3cret-token"
    assert body["unit"] == unit and body["result"] == "exit-code" and body["exit_status"] == "5"
    assert body["text"] == result.stdout.strip()


def test_notify_without_a_webhook_writes_the_journal_line_only() -> None:
    result = notify(f"drkit-prune@{INSTANCE}.service")
    assert result.returncode == 0
    assert result.stdout.startswith(f"drkit-prune@{INSTANCE}.service failed on ")
    assert "result exit-code, exited 5" in result.stdout


def test_notify_says_when_the_webhook_is_unreachable_without_showing_its_url() -> None:
    closed = "http://127.0.0.1:9/secret-path"  # discard port: nothing listens
    result = notify(f"drkit-prune@{INSTANCE}.service", NOTIFY_URL=closed, NOTIFY_RETRY_SECONDS="0")
    assert result.returncode == 1
    assert "did not take the notice after 3 tries" in result.stderr
    assert "secret-path" not in result.stderr + result.stdout
