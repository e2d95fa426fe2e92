"""drkit schedule and drkit metrics against a real cluster: jobs on second-level cron triggers,
the lock between overlapping backups, a clean stop on SIGTERM, one scheduler per cluster,
/metrics and the textfile, the health endpoints, webhooks on failure."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rig.archive import enable_archiving
from rig.drkit import DRKIT, Drkit
from rig.postgres import PgCluster, chown_to_server_user
from rig.servers import VaultServer
from rig.vault import VaultSetup

from drkit.schedule.metrics import FAMILIES

STOP_BOUND_S = 15  # SIGTERM to exit, with a stop_timeout of 2 s, on a loaded 2-core machine


class LoggedProcess:
    """A drkit process, its JSON log lines (stderr) collected as they arrive."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def wait_for(
        self,
        what: str,
        test: Callable[[dict[str, Any]], bool],
        timeout: float = 60,
        since: int = 0,
    ) -> dict[str, Any]:
        """The first log line from index ``since`` on that passes ``test``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[since:]:
                if test(line):
                    return line
            assert self.process.poll() is None, f"drkit exited:\n{''.join(self.raw)}"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{''.join(self.raw[-40:])}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class Daemon(LoggedProcess):
    """``drkit schedule`` as a process."""

    def __init__(self, dk: Drkit, user: str | None = None) -> None:
        super().__init__(spawn(dk, user))

    def finished(self, job: str, ok: bool = True) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if line.get("message") == "job finished" and line["job"] == job and line["ok"] == ok
        ]

    @property
    def url(self) -> str:
        started = self.wait_for("start", lambda line: line.get("message") == "scheduler started")
        return f"http://{started['listen']}"


def spawn(dk: Drkit, user: str | None) -> subprocess.Popen[str]:
    """``drkit schedule`` as root, or as ``user`` as its systemd unit runs it."""
    if user is None:
        return dk.spawn("schedule")
    return subprocess.Popen(
        [*DRKIT, "schedule", "--config", str(dk.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=user,
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONUNBUFFERED": "1"},
        cwd="/",
    )


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    values = [s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(values) == 1, (name, labels, found[name])
    return float(values[0])


def test_schedule_runs_the_jobs_serves_metrics_and_stops_cleanly(
    pg: PgCluster, workdir: Path, daemons: list[Daemon]
) -> None:
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g")
    dk = Drkit(
        pg,
        workdir,
        extra_repos=[
            {"name": "offsite", "path": workdir / "repo2", "media": "tape", "offsite": True}
        ],
    )
    dk.ok("init")
    schedule = {
        "full": "*/20 * * * * *",  # seconds first: full at :00, :20, :40, with an incr too
        "incr": "*/5 * * * * *",
        "replicate": "*/7 * * * * *",
        "verify": "*/11 * * * * *",
        "heartbeat": "*/3 * * * * *",
        "drill": "*/15 * * * * *",
        "report": "*/30 * * * * *",
        "report_dir": workdir / "reports",
        "stop_timeout": "2s",
        "lock_wait": "2m",
    }
    sections = {
        "schedule": schedule,
        "metrics": {"listen": "127.0.0.1:0"},
        "drill": {"sandbox": workdir / "sandboxes"},
    }
    enable_archiving(pg, dk, sections=sections)
    pg.psql("SELECT pg_switch_wal()")

    # --list shows the next run of every job from the same configuration
    listed = json.loads(dk.ok("schedule", "--list", "--json").stdout)
    jobs = ["full", "incr", "replicate", "verify", "drill", "heartbeat", "report"]
    assert [j["job"] for j in listed] == jobs

    # As the PostgreSQL user, like its systemd unit: the drill's restore_command (run by the
    # sandbox server as that user) reads every repository, copies included
    chown_to_server_user(workdir, recursive=True)
    daemon = Daemon(dk, "postgres")
    daemons.append(daemon)
    base = daemon.url
    assert get(f"{base}/health/live")[0] == 200

    # A second scheduler on the same cluster refuses to start, and says why
    second = spawn(dk, "postgres")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 5, err
    assert "another scheduler is already running" in err and "HINT:" in err

    # Within ~40 s: a full, incrementals, then replication and verification of them, heartbeats
    def finished(job: str) -> Callable[[dict[str, Any]], bool]:
        return lambda line: line.get("message") == "job finished" and line["job"] == job

    full = daemon.wait_for("a full backup", finished("full"), 60)
    since = daemon.lines.index(full)
    for job in ("incr", "replicate", "verify", "heartbeat"):
        daemon.wait_for(f"{job} after the full", finished(job), 60, since=since)
    drill = daemon.wait_for("a drill after the full", finished("drill"), 90, since=since)
    assert drill["ok"], "".join(daemon.raw)
    report = daemon.wait_for("a report", finished("report"), 90)
    assert report["ok"] and any((workdir / "reports").iterdir()), "".join(daemon.raw)
    daemon.wait_for("two incrementals", lambda line: len(daemon.finished("incr")) >= 2, 60)
    assert all(not daemon.finished(job, ok=False) for job in ("full", "incr", "replicate")), (
        "".join(daemon.raw)
    )

    # Overlapping triggers (full and incr both fire at :00, :20, :40) never ran two backups at
    # once: every backup started after the previous one stopped
    info = dk.info()
    spans = sorted((b["start_time"], b["stop_time"]) for b in info["backups"])
    assert len(spans) >= 3
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert start >= stop, spans
    assert any(
        line.get("message") == "job waiting for the repository lock" for line in daemon.lines
    )

    # /metrics: every family, with the runs just made
    status, text = get(f"{base}/metrics")
    assert status == 200
    found = families(text)
    assert set(FAMILIES) <= set(found), set(FAMILIES) - set(found)
    for job in ("full", "incr", "replicate", "verify", "drill", "report"):
        assert sample(found, "drkit_job_last_success_timestamp_seconds", job=job, repo="local") > 0
    assert sample(found, "drkit_drill_last_ok") == 1
    assert sample(found, "drkit_drill_rto_seconds") < sample(
        found, "drkit_drill_rto_target_seconds"
    )
    assert sample(found, "drkit_backup_last_size_bytes", type="full", repo="local") > 0
    assert sample(found, "drkit_verify_last_ok", repo="local") == 1
    assert sample(found, "drkit_copies_321_compliant") == 1
    assert sample(found, "drkit_wal_archive_lag_segments", repo="local") >= 0
    assert [(s.labels["provider"], s.value) for s in found["drkit_key_version"]] == [
        ("keyfile", 1.0)
    ]
    status, body = get(f"{base}/health/ready")
    assert status == 200, body
    assert json.loads(body)["checks"]["repository offsite"] == "ok"

    # SIGTERM while a backup runs: exit 0 within the bound, no partial backup listed
    daemon.wait_for(
        "a backup to start",
        lambda line: line.get("message") == "job started" and line["job"] in ("full", "incr"),
        60,
        since=len(daemon.lines),
    )
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    daemon.process.wait(timeout=STOP_BOUND_S)
    assert time.monotonic() - sent < STOP_BOUND_S
    assert daemon.process.returncode == 0, "".join(daemon.raw)
    daemon._reader.join(5)
    ends = {"scheduler stopped", "scheduler abandoning running jobs"}
    assert any(line.get("message") in ends for line in daemon.lines), "".join(daemon.raw)
    after = dk.info()
    assert dk.run("verify").exit_code == 0
    assert len(after["backups"]) >= len(info["backups"])

    # drkit metrics --textfile: the same families, written atomically (nothing else left)
    out = workdir / "prom"
    out.mkdir()
    dk.ok("metrics", "--textfile", str(out / "drkit.prom"))
    assert [p.name for p in out.iterdir()] == ["drkit.prom"]
    textfile = families((out / "drkit.prom").read_text())
    assert set(FAMILIES) <= set(textfile)
    assert (
        sample(textfile, "drkit_job_last_success_timestamp_seconds", job="full", repo="local") > 0
    )


class _Hooks(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_webhook_receives_the_failure_of_a_job(
    pg: PgCluster, workdir: Path, daemons: list[Daemon]
) -> None:
    hooks = type("Hooks", (_Hooks,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    repo = workdir / "repo"
    repo.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(repo)], check=True)
    try:
        url_file = workdir / "hook.url"
        url_file.write_text(f"http://127.0.0.1:{server.server_address[1]}/hook\n")
        url_file.chmod(0o600)
        dk = Drkit(pg, workdir)
        dk.ok("init")
        subprocess.run(["mount", "-o", "remount,ro", str(repo)], check=True)
        dk.write_config(
            schedule={"full": "*/2 * * * * *", "overdue_grace": "2s"},
            metrics={"listen": "127.0.0.1:0"},
        )
        with dk.config.open("a") as config:
            config.write(f'[[notify.webhooks]]\nname = "ops"\nurl_file = "{url_file}"\n')
        daemon = Daemon(dk)
        daemons.append(daemon)
        daemon.wait_for("a failed full", lambda line: bool(daemon.finished("full", ok=False)))

        # the failure is posted; with no backup for longer than the schedule allows (2 s + 2 s),
        # so is the overdue backup, once, and the scheduler is no longer ready
        def events() -> list[str]:
            return [got["event"] for got in hooks.received]

        deadline = time.monotonic() + 30
        while "backup-overdue" not in events() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "job-failed" in events() and "backup-overdue" in events(), "".join(daemon.raw)
        failed = next(got for got in hooks.received if got["event"] == "job-failed")
        assert failed["job"] == "full" and "read-only file system" in failed["summary"]
        status, body = get(f"{daemon.url}/health/ready")
        assert status == 503, body
        assert (
            json.loads(body)["checks"]["newest backup"] == "none yet, and the schedule allowed one"
        )
        daemon.wait_for(
            "two more failures", lambda line: len(daemon.finished("full", ok=False)) >= 3
        )
        assert events().count("backup-overdue") == 1
        assert str(server.server_address[1]) not in "".join(daemon.raw)  # the URL is never logged
    finally:
        server.shutdown()
        subprocess.run(["umount", "-l", str(repo)], check=False)


def test_schedule_configuration_errors_name_the_field(workdir: Path) -> None:
    config = workdir / "drkit.toml"
    config.write_text(
        '[postgres]\npgdata = "/srv/pg"\n[keys]\nkeyfile = "/etc/drkit/k"\n'
        '[[repo]]\nname = "local"\npath = "/srv/repo"\n'
        '[schedule]\nfull = "0 61 * * *"\nincr = "0 * * * 1"\ntimezone = "Mars/Olympus"\n'
        "jitter = -5\n"
        '[[notify.webhooks]]\nname = "ops"\nurl = "https://hooks.example/T000/SECRET"\n'
    )
    result = Drkit.__new__(Drkit)  # no cluster needed: the CLI refuses the file first
    result.config = config
    out = result.run("schedule", "--list")
    assert out.exit_code == 3, out.output
    assert "schedule.full: Value error, '0 61 * * *' is not a valid cron expression" in out.stderr
    assert "schedule.incr" in out.stderr and "days of the week as names" in out.stderr
    assert "schedule.timezone" in out.stderr and "unknown time zone 'Mars/Olympus'" in out.stderr
    assert "schedule.jitter" in out.stderr and "-5 is negative" in out.stderr
    assert "never written in drkit.toml" in out.stderr
    assert "SECRET" not in out.output


def test_every_metric_family_is_documented() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "monitoring.md").read_text()
    assert [name for name in FAMILIES if f"`{name}`" not in docs] == []


def test_scheduler_keeps_a_vault_token_alive_between_jobs(
    pg: PgCluster, workdir: Path, vault_server: VaultServer, daemons: list[Daemon]
) -> None:
    """A token that lives 10 s unless renewed: backups every 5 s still work 25 s later (more
    than twice its life), because the scheduler renews the token the jobs log in with."""
    setup = VaultSetup(vault_server, workdir)
    token_file = workdir / "vault-token"
    token_file.write_text(setup.token(setup.policy()))
    token_file.chmod(0o600)
    dk = Drkit(pg, workdir)
    setup.configure(dk, token_file=token_file)
    dk.ok("init")
    vault = {
        "addr": vault_server.addr,
        "allow_insecure_http": True,  # the test server, on loopback
        "timeout": 5,
        "transit_mount": setup.transit_mount,
        "transit_key": setup.transit_key,
        "token_file": token_file,
    }
    dk.write_config(
        keys={"provider": "vault-transit"},
        schedule={"full": "*/5 * * * * *"},
        metrics={"listen": "127.0.0.1:0"},
        **{"keys.vault": vault},
    )
    token_file.write_text(
        setup.token(setup.policy(), ttl="10s", renewable=True, explicit_max_ttl="5m")
    )
    expired = time.time() + 25
    daemon = Daemon(dk)
    daemons.append(daemon)

    def ended(line: dict[str, Any]) -> float:
        return (
            datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        )

    daemon.wait_for(
        "a backup 25 s after the token was made",
        lambda line: any(ended(done) > expired for done in daemon.finished("full")),
        90,
    )
    assert daemon.finished("full", ok=False) == [], "".join(daemon.raw)
