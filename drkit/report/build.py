"""Build the report from the facts: a pure function of what the repositories hold, the period,
the policy and the clock (``now`` decides only whether a period has ended: a cadence period
still running is "due", not "missing")."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Literal

from drkit.config.durations import format_duration
from drkit.repo.drills import DrillEntry, DrillRecord, drill_time, is_drill_id
from drkit.report.facts import BackupFact, Facts
from drkit.report.model import (
    AgePoint,
    BackupFailure,
    BackupRow,
    Backups,
    CadenceItem,
    CheckRow,
    DrillRow,
    FindingRow,
    Integrity,
    ObjectiveRow,
    ObjectiveSummary,
    PhaseRow,
    Report,
    Source,
    Span,
    Stat,
    Summary,
    WeekRow,
)
from drkit.report.period import Period, cadence_periods
from drkit.report.sections import copies, findings, integrity, keys, note_in, signoffs

# Drill kinds from the lightest to the most thorough; a drill counts for its kind and lighter.
KINDS = ("restore-test", "partial", "full")
_KIND_NAMES = {"restore-test": "restore test", "partial": "partial drill", "full": "full drill"}


@dataclass(frozen=True)
class Context:
    """What the report is made with besides the facts."""

    period: Period
    now: datetime
    rto_seconds: float
    rpo_seconds: float
    cadence: dict[str, str]  # drill kind -> monthly | quarterly | half-yearly | yearly | never
    drkit_version: str
    config_digest: str
    host: str


def build_report(facts: Facts, ctx: Context) -> Report:
    period = ctx.period
    in_period = [e for e in facts.drills if (at := _drill_start(e)) is None or at in period]
    found = findings(facts.notes)
    drills = [_drill_row(e, found) for e in in_period]
    cadence = _cadence(facts.drills, ctx)
    backups = _backups(facts, ctx)
    copied = copies(facts, period, backups.items)
    verified = integrity(facts.verify, [b.label for b in backups.items], period)
    report = Report(
        title=f"DR exercise report {period.label}",
        period=Span(label=period.label, start=period.start, end=period.end),
        generated_at=ctx.now,
        source=Source(
            repository=facts.source,
            repositories=facts.repositories,
            system_identifier=facts.system_identifier,
            drkit_version=ctx.drkit_version,
            config_digest=ctx.config_digest,
            host=ctx.host,
        ),
        targets={"rto_seconds": ctx.rto_seconds, "rpo_seconds": ctx.rpo_seconds},
        policy=dict(ctx.cadence),
        summary=_summary(drills, cadence, backups, verified, ctx),
        drills=drills,
        cadence=cadence,
        backups=backups,
        copies=copied,
        integrity=verified,
        keys=keys(facts, period),
        findings=[
            f
            for f in found.values()
            if f.drill in {d.id for d in drills} or (not f.authentic and note_in(f.id, period))
        ],
        signoffs=signoffs(facts.notes, period),
    )
    return report


# -- drills ---------------------------------------------------------------------------------------


def _drill_start(entry: DrillEntry) -> datetime | None:
    """When the drill started; for a record that cannot be read, from its id (the id is not
    authenticated, but a record that fails is listed either way)."""
    if entry.record is not None:
        return entry.record.started_at
    return drill_time(entry.id) if is_drill_id(entry.id) else None


def _drill_row(entry: DrillEntry, findings: dict[str, FindingRow]) -> DrillRow:
    record = entry.record
    if record is None:
        return DrillRow(
            id=entry.id, authentic=False, error=entry.error, started_at=_drill_start(entry)
        )
    point = record.restore_point
    target = None
    if point is not None:
        target = point.target_kind + (f" {point.target_value}" if point.target_value else "")
    return DrillRow(
        id=record.id,
        authentic=True,
        started_at=record.started_at,
        kind=str(record.kind),
        scenario=record.scenario,
        started_by=record.started_by,
        host=record.host,
        backup=point.backup if point else None,
        target=target,
        point_reason=point.reason if point else None,
        repository=record.repository,
        phases=[PhaseRow(name=p.name, seconds=p.seconds, detail=p.detail) for p in record.phases],
        rto=ObjectiveRow(**record.rto.model_dump()),
        rpo=ObjectiveRow(**record.rpo.model_dump()),
        rpo_method=record.rpo_detail.method or None,
        recovered_time=record.rpo_detail.recovered_time,
        checks=[
            CheckRow(name=c.name, kind=c.kind, ok=c.ok, seconds=c.seconds, detail=c.detail)
            for c in record.checks
        ],
        outcome=record.outcome.value,
        failure=str(record.failure) if record.failure else None,
        reason=record.reason,
        findings=[f.id for f in findings.values() if f.drill == record.id],
        pg_version=record.pg_version,
        restored_bytes=record.restored_bytes,
        wal_segments=record.wal_segments,
        predicted_seconds=record.predicted_seconds,
        restore_seconds=sum(
            p.seconds for p in record.phases if p.name in ("restore", "wal-replay+start")
        ),
    )


def _objective(rows: list[DrillRow], which: str, target: float) -> ObjectiveSummary:
    measured = [
        (objective.achieved_seconds, row.id)
        for row in rows
        if (objective := getattr(row, which)) is not None and objective.achieved_seconds is not None
    ]
    met = sum(1 for row in rows if getattr(row, which) and getattr(row, which).met is True)
    missed = sum(1 for row in rows if getattr(row, which) and getattr(row, which).met is False)
    summary = ObjectiveSummary(
        target_seconds=target, measured=len(measured), met=met, missed=missed
    )
    if measured:
        ordered = sorted(measured)
        median = statistics.median_low(ordered)  # a value one drill achieved, with its id
        summary.best = Stat(seconds=ordered[0][0], drill=ordered[0][1])
        summary.median = Stat(seconds=median[0], drill=median[1])
        summary.worst = Stat(seconds=ordered[-1][0], drill=ordered[-1][1])
    return summary


# -- cadence --------------------------------------------------------------------------------------


def _cadence(entries: list[DrillEntry], ctx: Context) -> list[CadenceItem]:
    records = [
        e.record for e in entries if e.record is not None and e.record.started_at < ctx.period.end
    ]
    items = []
    for kind in KINDS:
        cadence = ctx.cadence.get(kind, "never")
        if cadence == "never":
            continue
        counting = KINDS[KINDS.index(kind) :]
        for due in cadence_periods(cadence, ctx.period):
            ran = [r for r in records if str(r.kind) in counting and r.started_at in due]
            items.append(
                CadenceItem(
                    kind=kind,
                    period=due.label,
                    start=due.start,
                    end=due.end,
                    status=_status(ran, due, ctx.now),
                    drills=[r.id for r in ran],
                )
            )
    return items


def _status(ran: list[DrillRecord], due: Period, now: datetime) -> str:
    if any(r.outcome == "PASS" for r in ran):
        return "passed"
    if ran:
        return "failed"
    return "missing" if due.end <= now else "due"


# -- backups --------------------------------------------------------------------------------------


def _backups(facts: Facts, ctx: Context) -> Backups:
    period = ctx.period
    ordered = sorted(facts.backups, key=lambda b: b.stop)
    items = [b for b in ordered if b.start in period]
    rows = [_backup_row(b, facts) for b in items]
    weeks: dict[str, WeekRow] = {}
    for b in items:
        key = _week(b.start)
        if key not in weeks:
            weeks[key] = _week_row(key, b.start)
        row = weeks[key]
        setattr(row, b.type, getattr(row, b.type) + 1)
        row.size += b.size
        row.stored += b.stored
        row.labels.append(b.label)
    failures = facts.failures or []
    for f in failures:
        key = _week(f.time)
        if key not in weeks:
            weeks[key] = _week_row(key, f.time)
        row = weeks[key]
        row.failed = (row.failed or 0) + 1
    if facts.failures is not None:
        for row in weeks.values():
            row.failed = row.failed or 0
    ages = _newest_age(ordered, period, ctx.now)
    return Backups(
        items=rows,
        weeks=[weeks[k] for k in sorted(weeks)],
        failures_recorded=facts.failures is not None,
        failures=[
            BackupFailure(
                job=f.job, time=f.time, exit_code=f.exit_code, error=f.error, record=f.key
            )
            for f in failures
        ],
        damaged=[{"label": k, "reason": v} for k, v in sorted(facts.damaged.items())],
        newest_age=ages,
        worst_age=max(ages, key=lambda a: a.age_seconds) if ages else None,
        rpo_target_seconds=ctx.rpo_seconds,
    )


def _week(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def _week_row(key: str, moment: datetime) -> WeekRow:
    monday = moment.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=moment.weekday()
    )
    return WeekRow(
        week=key, start=monday, full=0, diff=0, incr=0, failed=None, size=0, stored=0, labels=[]
    )


def _backup_row(b: BackupFact, facts: Facts) -> BackupRow:
    holders = [r for r in facts.repositories if b.label in facts.holdings.get(r.name, set())]
    media = {"disk", *(r.media for r in holders)}  # the live database is one copy, on disk
    offsite = sum(1 for r in holders if r.offsite)
    copies = 1 + len(holders)
    return BackupRow(
        label=b.label,
        type=b.type,
        start=b.start,
        stop=b.stop,
        duration_seconds=b.duration_s,
        size=b.size,
        stored=b.stored,
        copies=copies,
        media=len(media),
        offsite=offsite,
        rule_3_2_1=copies >= 3 and len(media) >= 2 and offsite >= 1,
        repos=[r.name for r in holders],
    )


def _newest_age(ordered: list[BackupFact], period: Period, now: datetime) -> list[AgePoint]:
    """The newest backup's age just before each backup of the period completed, and at the
    period's end (or now): the peaks of the exposure curve, each naming the backup it counts
    from."""
    points = []
    for previous, b in pairwise(ordered):
        if b.stop in period:
            age = (b.stop - previous.stop).total_seconds()
            points.append(AgePoint(at=b.stop, age_seconds=age, backup=previous.label))
    end = min(period.end, now)
    if ordered and period.start <= ordered[-1].stop < end:
        age = (end - ordered[-1].stop).total_seconds()
        points.append(AgePoint(at=end, age_seconds=age, backup=ordered[-1].label))
    return points


# -- summary --------------------------------------------------------------------------------------


def _backup_problems(backups: Backups, verified: Integrity) -> list[str]:
    """What the verdict names about the backups themselves: unreadable manifests, damage a
    verification found and nothing repaired since, a newest backup without its 3 copies."""
    problems = []
    if backups.damaged:
        count = len(backups.damaged)
        problems.append(f"{count} backup{'s' * (count != 1)} cannot be read")
    unrepaired = [v for v in verified.failed_runs if not v.repaired]
    if unrepaired:
        count = len(unrepaired)
        problems.append(f"{count} verification{'s' * (count != 1)} found damage not repaired since")
    if backups.items and not backups.items[-1].rule_3_2_1:
        problems.append(f"the newest backup {backups.items[-1].label} does not meet 3-2-1")
    return problems


def _summary(
    drills: list[DrillRow],
    cadence: list[CadenceItem],
    backups: Backups,
    verified: Integrity,
    ctx: Context,
) -> Summary:
    authentic = [d for d in drills if d.authentic]
    passed = sum(1 for d in authentic if d.outcome == "PASS")
    failed = len(authentic) - passed
    unauthentic = len(drills) - len(authentic)
    missing = [c for c in cadence if c.status == "missing"]
    due = [c for c in cadence if c.status == "due"]
    rto = _objective(authentic, "rto", ctx.rto_seconds)
    rpo = _objective(authentic, "rpo", ctx.rpo_seconds)
    problems = []
    if not drills:
        problems.append("no drill this period")
    if failed:
        problems.append(f"{failed} drill{'s' * (failed != 1)} failed")
    if backups.failures:
        count = len(backups.failures)
        problems.append(f"{count} backup run{'s' * (count != 1)} failed")
    if unauthentic:
        problems.append(
            f"{unauthentic} drill record{'s' * (unauthentic != 1)} fail{'s' * (unauthentic == 1)}"
            " authentication"
        )
    for c in missing:
        problems.append(f"{_KIND_NAMES[c.kind]} for {c.period} missing")
    problems += _backup_problems(backups, verified)
    verdict: Literal["PASS", "FAIL"] = "FAIL" if problems else "PASS"
    if problems:
        line = "FAIL: " + "; ".join(problems)
    else:
        line = f"PASS: {passed} drill{'s' * (passed != 1)}, all passed; every required drill ran"
        if rto.worst is not None:
            line += f"; worst RTO {format_duration(rto.worst.seconds)}"
            line += f" (target {format_duration(ctx.rto_seconds)})"
        if rpo.worst is not None:
            line += f"; worst RPO {format_duration(rpo.worst.seconds)}"
            line += f" (target {format_duration(ctx.rpo_seconds)})"
    if not backups.failures_recorded:
        line += "; failed backup runs unknown (the primary repository cannot be read)"
    if due:
        line += "; still due: " + ", ".join(f"{_KIND_NAMES[c.kind]} {c.period}" for c in due)
    return Summary(
        verdict=verdict,
        verdict_line=line,
        drills=len(drills),
        passed=passed,
        failed=failed,
        unauthentic=unauthentic,
        rto=rto,
        rpo=rpo,
        cadence_missing=len(missing),
        cadence_due=len(due),
        backups=len(backups.items),
        backups_failed=None if not backups.failures_recorded else len(backups.failures),
    )
