"""``drkit schedule --emit``: systemd timers and Kubernetes CronJobs from ``[schedule]``.

``[schedule]`` stays the one source of truth for when jobs run, whichever runs them. The emitted
files are rendered from templates made from the ones drkit ships (systemd/*.timer,
deploy/kubernetes/cronjob-*.yaml); only the schedule, the time zone and the jitter come from
the configuration.

- systemd: one timer per configured job that has a unit (full, diff, incr, replicate, verify,
  prune, drill, report), named for the instance (``drkit-backup-full@main.timer`` starts the
  shipped ``drkit-backup-full@.service`` for ``main``). A cron expression becomes an
  ``OnCalendar=`` in the schedule's time zone; what a calendar cannot say (apscheduler's ``last``
  or ``2nd mon``) is refused.
- Kubernetes: one CronJob per configured job but the heartbeat (a long-running process), each
  in a pod of its own, with the configuration in remote mode (docs/kubernetes.md): the jobs that
  connect to PostgreSQL (backups, drills) also get its Secret. A CronJob has no seconds field: a
  schedule that needs one is refused.

A file that exists with other content is never overwritten (EmitConflict): it may hold an
operator's changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from drkit.config.schedule import cron_fields
from drkit.config.settings import Settings
from drkit.errors import ConfigError, EmitConflict
from drkit.fsutil import write_new

TEMPLATES = Path(__file__).parent / "templates"
SYSTEMD_UNITS = {
    "full": "drkit-backup-full",
    "diff": "drkit-backup-diff",
    "incr": "drkit-backup-incr",
    "replicate": "drkit-replicate",
    "verify": "drkit-verify",
    "prune": "drkit-prune",
    "drill": "drkit-drill",
    "report": "drkit-report",
}
_DAYS = {d: d.capitalize() for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
_PLAIN = re.compile(r"\d+(-\d+)?(/\d+)?|\*(/\d+)?")


@dataclass(frozen=True)
class CronJobShape:
    """What the shipped CronJob of a job has of its own (deploy/kubernetes/cronjob-<job>.yaml)."""

    comment: tuple[str, ...]
    args: tuple[str, ...]
    deadline: int
    cpu: str
    memory: str
    memory_limit: str
    volume: dict[str, object] | None = None
    postgres: bool = False  # it connects to PostgreSQL: the Secret drkit-postgres is mounted


def _backup(kind: str, title: str) -> CronJobShape:
    return CronJobShape(
        (
            f"{title} (drkit backup --type {kind}), taken over a replication connection to",
            "PostgreSQL (remote mode, docs/remote.md): this pod needs no access to its volume.",
        ),
        ("backup", "--type", kind),
        21600,
        "1",
        "512Mi",
        "2Gi",
        postgres=True,
    )


CRONJOBS = {
    "full": _backup("full", "Weekly full backup"),
    "diff": _backup("diff", "Nightly differential backup"),
    "incr": _backup("incr", "Hourly incremental backup"),
    "replicate": CronJobShape(
        (
            "Copy what a repository lacks from the others (drkit replicate): backups, WAL and",
            "records a backup's fan-out could not copy at the time. Needs no PostgreSQL.",
        ),
        ("replicate",),
        21600,
        "250m",
        "256Mi",
        "1Gi",
    ),
    "prune": CronJobShape(
        (
            "Retention (drkit prune): removes the backups and WAL [retention] no longer keeps,",
            "in every repository. Needs no PostgreSQL.",
        ),
        ("prune",),
        3600,
        "250m",
        "256Mi",
        "1Gi",
    ),
    "verify": CronJobShape(
        (
            "Read back every backup and the WAL archive (drkit verify --wal). Read-only on the",
            "repositories, so it runs anywhere; a failure (exit 15: damage found) fails the Job.",
        ),
        ("verify", "--wal"),
        43200,
        "250m",
        "256Mi",
        "1Gi",
    ),
    "drill": CronJobShape(
        (
            "Restore drill (drkit drill): restores the newest backup into a sandbox, starts it,",
            "checks it, records the achieved RTO and RPO in every repository. Needs the PostgreSQL",
            "server binaries of the cluster's major version in the image (Dockerfile: PG_MAJOR).",
        ),
        ("drill", "--started-by", "scheduler"),
        14400,
        "1",
        "1Gi",
        "4Gi",
        {
            "name": "sandbox",
            "path": "/var/lib/drkit/drill",
            "comment": (
                "The restored copy lives here for the drill's length: size it for the whole",
                "database (or use an ephemeral volume claim for large ones).",
            ),
            "source": "              emptyDir:\n                sizeLimit: 50Gi",
        },
        postgres=True,  # the source's WAL position, for the RPO
    ),
    "report": CronJobShape(
        (
            "DR exercise report of the current quarter (drkit report: HTML and JSON), kept on the",
            "drkit-reports volume (reports-pvc.yaml). It only reads the repositories.",
        ),
        ("report", "--out", "/var/lib/drkit/reports"),
        3600,
        "250m",
        "256Mi",
        "1Gi",
        {
            "name": "reports",
            "path": "/var/lib/drkit/reports",
            "comment": (),
            "source": (
                "              persistentVolumeClaim:\n                claimName: drkit-reports"
            ),
        },
    ),
}
CONFIG_IN_POD = "/etc/drkit/drkit.toml"


@dataclass
class Emitted:
    """What ``emit`` wrote (or found already there, identical), and the jobs it left out."""

    written: list[Path]
    unchanged: list[Path]
    skipped: dict[str, str]  # job -> why it has no file of this kind


def emit(settings: Settings, kind: str, out: Path, config: Path, instance: str) -> Emitted:
    """Write the ``kind`` ("systemd" or "kubernetes") files of every job in ``[schedule]``
    into ``out``. Raises ConfigError for a schedule the target cannot express, EmitConflict for
    a file in the way."""
    files, skipped = (
        _systemd(settings, config, instance) if kind == "systemd" else _kubernetes(settings, config)
    )
    result = Emitted([], [], skipped)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / name
        if path.exists():
            if path.read_text() != text:
                raise EmitConflict(
                    f"'{path}' exists and differs from what drkit would write",
                    hint="remove it (or move your changes into a drop-in), or emit into an"
                    " empty directory",
                )
            result.unchanged.append(path)
            continue
        try:
            with write_new(path, mode=0o644) as file:
                file.write(text.encode())
        except FileExistsError:  # made meanwhile: compared on the next run
            raise EmitConflict(f"'{path}' appeared while drkit wrote it") from None
        except OSError as exc:
            raise ConfigError(
                f"unable to write '{path}': {exc.strerror or exc}",
                hint="emit into a directory this user may write",
            ) from None
        result.written.append(path)
    return result


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - unit files and YAML, not HTML
    )


def _systemd(
    settings: Settings, config: Path, instance: str
) -> tuple[dict[str, str], dict[str, str]]:
    template = _environment().get_template("timer.j2")
    schedule = settings.schedule
    jitter = int(schedule.jitter.total_seconds())
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for job, cron in schedule.jobs().items():
        unit = SYSTEMD_UNITS.get(job)
        if unit is None:
            skipped[job] = "it runs as a service of its own (drkit-heartbeat@.service)"
            continue
        fields = cron_fields(cron)
        files[f"{unit}@{instance}.timer"] = template.render(
            config=config,
            job=job,
            unit=unit,
            instance=instance,
            cron=cron,
            timezone=schedule.timezone,
            calendar=on_calendar(cron, schedule.timezone),
            jitter=f"{jitter}s" if jitter else "",
            accuracy="1min" if fields["second"] == "0" else "1s",
        )
    return files, skipped


def _kubernetes(settings: Settings, config: Path) -> tuple[dict[str, str], dict[str, str]]:
    template = _environment().get_template("cronjob.yaml.j2")
    schedule = settings.schedule
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for job, cron in schedule.jobs().items():
        shape = CRONJOBS.get(job)
        if shape is None:
            skipped[job] = "it runs as a long-running process (drkit heartbeat), not a CronJob"
            continue
        files[f"cronjob-{job}.yaml"] = template.render(
            config=config,
            job=job,
            comment=shape.comment,
            schedule=kubernetes_schedule(job, cron),
            timezone=schedule.timezone,
            deadline=shape.deadline,
            args=[*shape.args, "--config", CONFIG_IN_POD],
            cpu=shape.cpu,
            memory=shape.memory,
            memory_limit=shape.memory_limit,
            volume=shape.volume,
            postgres=shape.postgres,
        )
    return files, skipped


def on_calendar(cron: str, timezone: str) -> str:
    """systemd's ``OnCalendar=`` for a cron expression of ``[schedule]``, read in ``timezone``:
    '15 0,4-23 * * *' -> '*-*-* 00,04..23:15:00 UTC'. Raises ConfigError for what a calendar
    expression cannot say."""
    fields = cron_fields(cron)
    time = ":".join(_field(cron, fields[f], 0, 2) for f in ("hour", "minute", "second"))
    date = "-".join(["*", _field(cron, fields["month"], 1, 2), _field(cron, fields["day"], 1, 2)])
    days = _weekdays(cron, fields["day_of_week"])
    return " ".join(part for part in (days, date, time, timezone) if part)


def kubernetes_schedule(job: str, cron: str) -> str:
    """A CronJob's five-field schedule; ConfigError when the expression needs seconds."""
    fields = cron_fields(cron)
    if fields["second"] != "0":
        raise ConfigError(
            f"schedule.{job} = '{cron}' runs at seconds a CronJob cannot express",
            hint="use a five-field expression (minute hour day month day-of-week)",
        )
    for name, value in fields.items():
        if name != "day_of_week" and not all(_PLAIN.fullmatch(v) for v in value.split(",")):
            raise _unsupported(cron, value, "a CronJob")
    numeric = ",".join(_crontab_days(cron, item) for item in fields["day_of_week"].split(","))
    return " ".join([*cron.split()[-5:-1], numeric])


def _crontab_days(cron: str, item: str) -> str:
    """Weekday names as crontab numbers (0 = Sunday), which every cron reads alike: 'mon-fri'
    -> '1-5'; a range ending on Sunday (last in [schedule]'s week) -> '6,0'."""
    if item == "*":
        return item
    names = list(_DAYS)  # mon .. sun, as [schedule] orders the week
    low, _, high = item.lower().partition("-")
    if low not in _DAYS or (high and high not in _DAYS):
        raise _unsupported(cron, item, "a CronJob")
    first, last = names.index(low), names.index(high or low)
    days = [(i + 1) % 7 for i in range(first, last + 1)]
    if days == list(range(days[0], days[0] + len(days))) and len(days) > 1:
        return f"{days[0]}-{days[-1]}"
    return ",".join(str(d) for d in days)


def _field(cron: str, value: str, first: int, width: int) -> str:
    """One numeric cron field in calendar syntax: '*', '*/15' -> '00/15', '4-23' -> '04..23'."""
    out = []
    for item in value.split(","):
        if not _PLAIN.fullmatch(item):
            raise _unsupported(cron, value, "a systemd calendar")
        span, _, step = item.partition("/")
        if span == "*":
            out.append(f"{first:0{width}d}/{step}" if step else "*")
            continue
        low, _, high = span.partition("-")
        if high and step:  # a stepped range: its values, as systemd has no such syntax
            values = range(int(low), int(high) + 1, int(step))
            out.append(",".join(f"{v:0{width}d}" for v in values))
        elif high:
            out.append(f"{int(low):0{width}d}..{int(high):0{width}d}")
        else:
            out.append(f"{int(low):0{width}d}" + (f"/{step}" if step else ""))
    return ",".join(out)


def _weekdays(cron: str, value: str) -> str:
    if value == "*":
        return ""
    out = []
    for item in value.lower().split(","):
        low, _, high = item.partition("-")
        if low not in _DAYS or (high and high not in _DAYS):
            raise _unsupported(cron, value, "a systemd calendar")
        out.append(f"{_DAYS[low]}..{_DAYS[high]}" if high else _DAYS[low])
    return ",".join(out)


def _unsupported(cron: str, value: str, target: str) -> ConfigError:
    return ConfigError(
        f"'{value}' in the cron expression '{cron}' cannot be written as {target}",
        hint="use numbers, '*', ranges (a-b), steps (*/n) and lists, and weekday names",
    )
