"""The report's sections on what the repositories hold besides drills and backups: copies
(3-2-1, WAL), integrity (verification runs), keys (versions, rotations, escrow) and notes
(findings, sign-offs). Pure functions of the facts, like build.py."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from drkit.repo.drills import drill_time, is_drill_id
from drkit.repo.label import BackupLabel
from drkit.repo.notes import Finding, NoteEntry, Signoff
from drkit.report.facts import Facts, VerifyFact
from drkit.report.model import (
    BackupRow,
    Copies,
    ExposurePoint,
    FindingRow,
    Integrity,
    Keys,
    KeyVersion,
    RepositoryCopies,
    SignoffRow,
    VerifyRun,
)
from drkit.report.period import Period


def copies(facts: Facts, period: Period, rows: list[BackupRow]) -> Copies:
    labels = {row.label for row in rows}
    wal = {w.repo: w for w in facts.wal}
    repos = []
    for r in facts.repositories:
        w = wal.get(r.name)
        repos.append(
            RepositoryCopies(
                name=r.name,
                media=r.media,
                offsite=r.offsite,
                object_lock=r.object_lock,
                backups=len(labels & facts.holdings.get(r.name, set())),
                wal_segments=w.segments if w else 0,
                newest_wal=w.newest if w else None,
                newest_wal_at=w.newest_at if w else None,
                wal_lag=w.lag if w else None,
            )
        )
    exposure = [
        ExposurePoint(
            drill=e.record.id,
            at=e.record.started_at,
            repo=x.repo,
            wal_age_seconds=x.newest_wal_age_seconds,
            backup_age_seconds=x.newest_backup_age_seconds,
        )
        for e in facts.drills
        if e.record is not None and e.record.started_at in period
        for x in e.record.exposure
    ]
    return Copies(
        passing=sum(1 for r in rows if r.rule_3_2_1),
        failing=sum(1 for r in rows if not r.rule_3_2_1),
        repositories=repos,
        exposure=exposure,
    )


def integrity(runs: list[VerifyFact], labels: list[str], period: Period) -> Integrity:
    by_copy: dict[tuple[str, str], list[VerifyFact]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.time):
        by_copy[(run.repo, run.label)].append(run)
    failed, passed, verified = [], 0, set()
    for (_, label), history in by_copy.items():
        for i, run in enumerate(history):
            if run.time not in period:
                continue
            verified.add(label)
            if run.ok:
                passed += 1
                continue
            repaired = any(later.ok for later in history[i + 1 :])
            failed.append(
                VerifyRun(
                    repo=run.repo,
                    backup=run.label,
                    time=run.time,
                    ok=False,
                    damaged_files=run.damaged,
                    repaired=repaired,
                    record=run.key,
                )
            )
    return Integrity(
        runs=passed + len(failed),
        failed_runs=sorted(failed, key=lambda r: r.time),
        passed_runs=passed,
        verified_backups=len(verified & set(labels)),
        unverified=[label for label in labels if label not in verified],
    )


def _set_time(kind: str, name: str) -> datetime | None:
    """When a key record set was made, from its name (label, drill id, WAL key period); read
    by slicing, not strptime: there is one per backup."""
    if kind == "backup" and BackupLabel.is_label(name):
        digits = name.rpartition("_")[2][:15].replace("-", "")
    elif kind in ("drill", "note") and is_drill_id(name):
        digits = name[:15].replace("-", "")
    elif kind == "wal" and name.isdigit() and len(name) in (8, 10):
        digits = name.ljust(14, "0")
    else:
        return None
    y, mo, d, h, mi, sec = (int(digits[i:j]) for i, j in _STAMP_FIELDS)
    return datetime(y, mo, d, h, mi, sec, tzinfo=UTC)


_STAMP_FIELDS = ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14))


def keys(facts: Facts, period: Period) -> Keys:
    first: dict[tuple[str, str, int | None], tuple[datetime | None, str]] = {}
    count: dict[tuple[str, str, int | None], int] = defaultdict(int)
    for s in facts.key_sets:
        ident = (s.provider, s.key, s.version)
        count[ident] += 1
        when = _set_time(s.kind, s.name)
        known = first.get(ident)
        if known is None or (when is not None and (known[0] is None or when < known[0])):
            first[ident] = (when, f"{s.kind} {s.name}")
    versions = [
        KeyVersion(
            provider=ident[0],
            key=ident[1],
            version=ident[2],
            sets=count[ident],
            first_used_by=first[ident][1],
            first_used_at=first[ident][0],
            rotated_in_period=(at := first[ident][0]) is not None and at in period,
        )
        for ident in sorted(count, key=lambda i: (i[0], i[1], i[2] or 0))
    ]
    return Keys(
        versions=versions,
        sets=len(facts.key_sets),
        escrowed=sum(1 for s in facts.key_sets if s.escrowed),
        escrow_missing=[f"{s.kind} {s.name}" for s in facts.key_sets if not s.escrowed],
    )


# -- notes ----------------------------------------------------------------------------------------


def findings(notes: list[NoteEntry]) -> dict[str, FindingRow]:
    found = {}
    for entry in notes:
        note = entry.note
        if note is None:
            found[entry.id] = FindingRow(id=entry.id, authentic=False, error=entry.error)
        elif isinstance(note, Finding):
            found[entry.id] = FindingRow(
                id=note.id,
                authentic=True,
                drill=note.drill,
                finding=note.finding,
                action=note.action,
                owner=note.owner,
                written_at=note.written_at,
                written_by=note.written_by,
            )
    return found


def note_in(note_id: str, period: Period) -> bool:
    """Whether a note that cannot be read was written in ``period``, from its id (not
    authenticated, but a note that fails is listed either way rather than dropped)."""
    return is_drill_id(note_id) and drill_time(note_id) in period


def signoffs(notes: list[NoteEntry], period: Period) -> list[SignoffRow]:
    rows = []
    for entry in notes:
        note = entry.note
        if isinstance(note, Signoff) and note.period == period.label:
            rows.append(
                SignoffRow(
                    id=note.id,
                    authentic=True,
                    period=note.period,
                    by=note.by,
                    statement=note.statement,
                    written_at=note.written_at,
                )
            )
    return rows
