"""The [schedule] expressions as apscheduler triggers: next runs, intervals, overdue limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from drkit.config.schedule import cron_fields
from drkit.config.settings import Settings


def triggers(settings: Settings) -> dict[str, CronTrigger]:
    """job -> its trigger, for every configured job (the expressions were validated on load)."""
    schedule = settings.schedule
    jitter = int(schedule.jitter.total_seconds()) or None
    return {
        job: CronTrigger(**cron_fields(expr), timezone=schedule.timezone, jitter=jitter)
        for job, expr in schedule.jobs().items()
    }


def next_runs(settings: Settings, now: datetime | None = None) -> list[tuple[str, str, datetime]]:
    """(job, expression, next run) for every configured job, in [schedule]'s order."""
    now = now or datetime.now(UTC)
    exprs = settings.schedule.jobs()
    out = []
    for job, trigger in triggers(settings).items():
        fire = trigger.get_next_fire_time(None, now)
        if fire is not None:
            out.append((job, exprs[job], fire))
    return out


def interval(trigger: CronTrigger, now: datetime) -> timedelta | None:
    """The gap between the next two runs of ``trigger`` (None when it runs at most once)."""
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
    return second - first if first and second else None


def allowed_age(settings: Settings, jobs: tuple[str, ...], now: datetime) -> timedelta | None:
    """How old the newest result of ``jobs`` may be: the shortest interval among them plus
    ``overdue_grace``; None when none of them is scheduled."""
    found = triggers(settings)
    gaps = [gap for job in jobs if job in found and (gap := interval(found[job], now))]
    return min(gaps) + settings.schedule.overdue_grace if gaps else None
