"""drkit schedule --emit: the systemd timers and Kubernetes CronJobs of [schedule] are what
systemd and Kubernetes accept, run when drkit schedule would, and match the shipped files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from apscheduler.triggers.cron import CronTrigger
from typer.testing import CliRunner

from drkit.cli.main import app
from drkit.config.schedule import cron_fields
from drkit.errors import ConfigError, EmitConflict

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS = REPO_ROOT / "systemd"
KUBE = REPO_ROOT / "deploy" / "kubernetes"
DRKIT_BIN = Path(sys.executable).parent / "drkit"
KUBERNETES_VERSIONS = ["1.35.0", "1.37.0"]

# The schedule of the shipped timers and CronJobs, as [schedule] cron expressions.
SHIPPED = {
    "full": "0 1 * * sun",
    "diff": "0 1 * * mon-sat",
    "incr": "15 0,4-23 * * *",
    "replicate": "45 * * * *",
    "verify": "0 5 * * sat",
    "prune": "0 6 * * *",
    "drill": "0 3 1 * *",
    "report": "0 7 * * mon",
}


def configure(tmp_path: Path, schedule: dict[str, str], name: str = "main") -> Path:
    lines = [
        "[postgres]",
        f'pgdata = "{tmp_path}"',
        "[keys]",
        'provider = "keyfile"',
        f'keyfile = "{tmp_path / "k"}"',
        "[schedule]",
        *(f'{k} = "{v}"' for k, v in schedule.items()),
        "[[repo]]",
        'name = "local"',
        f'path = "{tmp_path / "repo"}"',
    ]
    config = tmp_path / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def emit(config: Path, kind: str, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(
        app, ["schedule", "--emit", kind, "--out", str(out), "--config", str(config), *extra]
    )


def timer_entry(path: Path, key: str) -> str:
    [value] = [
        line.partition("=")[2] for line in path.read_text().splitlines() if line.startswith(key)
    ]
    return value


def test_systemd_timers_match_the_shipped_ones_and_systemd_accepts_them(tmp_path: Path) -> None:
    config = configure(tmp_path, {**SHIPPED, "heartbeat": "*/10 * * * *", "jitter": "5m"})
    out = tmp_path / "units"
    result = emit(config, "systemd", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["skipped"]) == ["heartbeat"]  # a service of its own, no timer
    emitted = sorted(Path(p).name for p in data["written"])
    shipped = [p.name for p in UNITS.glob("*@.timer") if "metrics" not in p.name]
    assert emitted == sorted(n.replace("@.", "@main.") for n in shipped)

    # The same calendars as the shipped timers, in [schedule]'s time zone
    for name in emitted:
        shipped = timer_entry(UNITS / name.replace("@main.", "@."), "OnCalendar")
        assert timer_entry(out / name, "OnCalendar") == f"{shipped} UTC", name
        assert timer_entry(out / name, "RandomizedDelaySec") == "300s"

    # systemd accepts them, with the services drkit ships (binary pointed at this checkout)
    for service in UNITS.glob("drkit-*@.service"):
        text = service.read_text().replace("/usr/local/bin/drkit", str(DRKIT_BIN))
        text = text.replace("/usr/local/libexec/drkit-notify", str(UNITS / "drkit-notify"))
        (out / service.name).write_text(text)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *emitted],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{out}:"},
        cwd=out,
        check=False,
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # Emitting again changes nothing; a file changed by hand is never overwritten
    again = emit(config, "systemd", out)
    assert again.exit_code == 0 and "is up to date" in again.stdout
    edited = out / "drkit-prune@main.timer"
    edited.write_text(edited.read_text().replace("06:00:00", "07:00:00"))
    conflict = emit(config, "systemd", out)
    assert conflict.exit_code == EmitConflict.exit_code == 33, conflict.output
    assert f"'{edited}' exists and differs" in conflict.stderr and "HINT:" in conflict.stderr
    assert "07:00:00" in edited.read_text()


@pytest.mark.parametrize(
    "cron",
    [
        "*/20 * * * *",
        "30 2 * * mon-fri",
        "0 */6 1-7 * sun",
        "0 9 1,15 * mon,wed,fri",
        "10 8-20/4 * * *",
        "5 0 */3 * *",
        "*/15 * * * * *",
    ],
)
def test_a_timer_fires_when_drkit_schedule_would(tmp_path: Path, cron: str) -> None:
    """systemd's next elapses of the emitted calendar are apscheduler's next fire times."""
    config = configure(tmp_path, {"verify": cron, "timezone": "Europe/Berlin"})
    result = emit(config, "systemd", tmp_path / "units")
    assert result.exit_code == 0, result.output
    calendar = timer_entry(tmp_path / "units" / "drkit-verify@main.timer", "OnCalendar")
    shown = subprocess.run(
        ["systemd-analyze", "calendar", "--iterations=6", calendar],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TZ": "UTC"},
    ).stdout
    systemd = [
        datetime.strptime(m, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        for m in re.findall(
            r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", shown
        )
    ]
    assert len(systemd) == 6, shown
    trigger = CronTrigger(**cron_fields(cron), timezone="Europe/Berlin")
    fires, previous = [], None
    now = datetime.now(UTC)
    for _ in range(6):
        at = trigger.get_next_fire_time(previous, previous or now)
        assert at is not None
        fires.append(at.astimezone(UTC))
        previous = at
    assert systemd == fires, calendar


def test_what_a_calendar_or_cronjob_cannot_say_is_refused(tmp_path: Path) -> None:
    config = configure(tmp_path, {"drill": "0 3 last * *"})
    result = emit(config, "systemd", tmp_path / "units")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "'last' in the cron expression '0 3 last * *' cannot be written" in result.stderr
    assert not (tmp_path / "units" / "drkit-drill@main.timer").exists()

    seconds = configure(tmp_path, {"verify": "30 0 5 * * sat"}, "seconds")
    result = emit(seconds, "kubernetes", tmp_path / "kube")
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "schedule.verify = '30 0 5 * * sat' runs at seconds a CronJob" in result.stderr

    no_out = CliRunner().invoke(app, ["schedule", "--emit", "systemd", "--config", str(config)])
    assert no_out.exit_code == ConfigError.exit_code and "--emit needs --out" in no_out.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_cronjobs_match_the_shipped_ones_and_validate(tmp_path: Path, version: str) -> None:
    config = configure(tmp_path, {**SHIPPED, "heartbeat": "* * * * *", "timezone": "Etc/UTC"})
    out = tmp_path / "kube"
    result = emit(config, "kubernetes", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["skipped"]) == ["heartbeat"]  # long-running, no CronJob
    written = sorted(Path(p).name for p in data["written"])
    assert written == sorted(f"cronjob-{job}.yaml" for job in SHIPPED)
    assert written == sorted(p.name for p in KUBE.glob("cronjob-*.yaml"))
    for name in written:
        emitted = yaml.safe_load((out / name).read_text())
        kubernetes_validate.validate(emitted, version, strict=True)
        assert emitted == yaml.safe_load((KUBE / name).read_text()), name

    # Another schedule and zone: only those change
    other = configure(
        tmp_path, {"verify": "30 2 * * mon-fri,sun", "timezone": "Europe/Berlin"}, "b"
    )
    assert emit(other, "kubernetes", tmp_path / "other").exit_code == 0
    cronjob = yaml.safe_load((tmp_path / "other" / "cronjob-verify.yaml").read_text())
    kubernetes_validate.validate(cronjob, version, strict=True)
    assert (cronjob["spec"]["schedule"], cronjob["spec"]["timeZone"]) == (
        "30 2 * * 1-5,0",
        "Europe/Berlin",
    )
