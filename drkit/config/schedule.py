"""``[schedule]``, ``[metrics]`` and ``[notify]`` settings (docs/scheduling.md, docs/monitoring.md).

One cron expression per job is the single source of truth for ``drkit schedule``, its
``--list`` and the documented systemd timers and CronJobs. Expressions are checked with
apscheduler's own parser when the configuration loads, so a typo is a per-field configuration
error at start, not a job that silently never runs.

Webhook URLs carry their secret in the URL itself (a Slack incoming webhook is a bearer token),
so they are read from a file or an environment variable named here, never written in drkit.toml.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drkit.config.durations import Duration

# The jobs ``[schedule]`` knows, in the order ``drkit schedule --list`` shows them.
JOBS = ("full", "diff", "incr", "replicate", "verify", "prune", "drill", "heartbeat", "report")
BACKUP_JOBS = ("full", "diff", "incr")
_CRON_FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week")
NotifyEvent = Literal["job-failed", "drill-failed", "backup-overdue", "drill-overdue"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = (
    "job-failed",
    "drill-failed",
    "backup-overdue",
    "drill-overdue",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def cron_fields(expression: str) -> dict[str, str]:
    """The fields of a cron expression, as apscheduler's CronTrigger takes them: five (minute
    hour day month day-of-week, as crontab) or six with a leading seconds field. Raises
    ValueError naming what is wrong."""
    from apscheduler.triggers.cron import CronTrigger  # only where a schedule is configured

    parts = expression.split()
    if len(parts) not in (5, 6):
        raise ValueError(
            f"'{expression}' has {len(parts)} fields; a cron expression has 5 (minute hour day"
            " month day-of-week) or 6 (seconds first)"
        )
    if len(parts) == 5:
        parts = ["0", *parts]
    fields = dict(zip(_CRON_FIELDS, parts, strict=True))
    if any(c.isdigit() for c in fields["day_of_week"]):
        # crontab counts 0 = Sunday, apscheduler 3 counts 0 = Monday: names mean one thing
        raise ValueError(
            f"'{expression}': write days of the week as names (mon-fri, sun), not numbers"
        )
    try:
        CronTrigger(**fields, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"'{expression}' is not a valid cron expression: {exc}") from None
    return fields


class ScheduleSettings(_Section):
    """When ``drkit schedule`` runs each job; a job without an expression never runs."""

    full: str | None = Field(None, description="cron expression of full backups")
    diff: str | None = None
    incr: str | None = None
    replicate: str | None = None
    verify: str | None = None
    prune: str | None = None
    drill: str | None = None
    heartbeat: str | None = None
    report: str | None = None
    report_dir: Path = Field(
        Path("/var/lib/drkit/reports"),
        description="where the report job writes its report (HTML and JSON)",
    )
    timezone: str = Field("UTC", description="time zone the expressions are read in")
    jitter: Duration = Field(
        timedelta(0), description="each run starts up to this much later, at random"
    )
    misfire_grace: Duration = Field(
        timedelta(minutes=5),
        description="a run missed by less than this (the host was busy or asleep) still runs",
    )
    lock_wait: Duration = Field(
        timedelta(hours=1),
        description="a job that finds the repository locked waits this long before failing",
    )
    stop_timeout: Duration = Field(
        timedelta(seconds=30),
        description="on SIGTERM, running jobs get this long to finish; then they are abandoned"
        " (a backup's objects stay unlisted and the next backup removes them)",
    )
    overdue_grace: Duration = Field(
        timedelta(hours=1),
        description="a backup or drill is overdue when it is older than its schedule's interval"
        " plus this",
    )

    @field_validator(*JOBS)
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_fields(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone '{value}' (e.g. 'UTC', 'Europe/Berlin')") from None
        return value

    def jobs(self) -> dict[str, str]:
        """job -> cron expression, for every configured job."""
        return {job: expr for job in JOBS if (expr := getattr(self, job)) is not None}


class MetricsSettings(_Section):
    """Where ``drkit schedule`` and ``drkit metrics --serve`` serve /metrics and the health
    endpoints."""

    listen: str = Field(
        "127.0.0.1:9187", description="host:port (port 0: any free port, logged at start)"
    )
    cache: Duration = Field(
        timedelta(seconds=15), description="a scrape within this of the previous one reuses it"
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"'{value}' is not host:port, e.g. '127.0.0.1:9187'")
        return value

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class Webhook(_Section):
    """One webhook. Its URL is read from ``url_file`` or the variable ``url_env`` when drkit
    starts; an inline ``url`` is refused (it is a secret)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    url_file: Path | None = None
    url_env: str | None = None
    format: Literal["json", "slack"] = Field(
        "json", description="json: drkit's event object; slack: {'text': ...}"
    )
    events: list[Literal["job-failed", "drill-failed", "backup-overdue", "drill-overdue"]] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS)
    )
    timeout: float = Field(10, gt=0, le=120, description="seconds per attempt")
    attempts: int = Field(5, ge=1, le=20)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(str(k).lower() in ("url", "token") for k in data):
            raise ValueError(
                "a webhook URL is a secret and is never written in drkit.toml: put it in a file"
                " (url_file = '/etc/drkit/slack.url', mode 0600) or an environment variable"
                " (url_env = 'DRKIT_SLACK_WEBHOOK')"
            )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Webhook:
        if (self.url_file is None) == (self.url_env is None):
            raise ValueError(f"webhook '{self.name}' needs exactly one of url_file or url_env")
        return self

    def url(self) -> str:
        """The URL, read now; ValueError (without the URL) when it cannot be read."""
        if self.url_env is not None:
            value = os.environ.get(self.url_env, "")
            where = f"environment variable {self.url_env}"
        else:
            assert self.url_file is not None
            try:
                value = self.url_file.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read '{self.url_file}': {exc.strerror}") from None
            where = f"'{self.url_file}'"
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{where} does not hold an http(s) URL")
        return value


class NotifySettings(_Section):
    webhooks: list[Webhook] = Field(default_factory=list)
    queue: int = Field(100, ge=1, le=10000, description="notifications waiting; more are dropped")
