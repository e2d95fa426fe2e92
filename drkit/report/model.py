"""The report as data: what every renderer shows and what ``--format json`` writes.

Every number names the records it comes from (a drill id, a backup label, a note id), so a
reader can check it against ``drkit drill list`` or ``drkit info``. docs/report.schema.json is
this model's JSON Schema; ``SCHEMA_VERSION`` changes when a field changes meaning.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Span(_Part):
    label: str = Field(description="'2026Q4' or '2026-10-01..2026-12-31'")
    start: datetime
    end: datetime = Field(description="exclusive")


class RepositoryFacts(_Part):
    name: str
    type: str
    media: str
    offsite: bool
    object_lock: str | None = Field(None, description="'COMPLIANCE 30d', or none")
    reachable: bool
    error: str | None = None


class Source(_Part):
    repository: str = Field(description="the repository the report was read from")
    repositories: list[RepositoryFacts]
    system_identifier: str
    drkit_version: str
    config_digest: str = Field(description="sha256 of the effective settings (secrets masked)")
    host: str


class Stat(_Part):
    """One achieved value and the drill it comes from."""

    seconds: float
    drill: str


class ObjectiveSummary(_Part):
    target_seconds: float | None = Field(description="the configured target ([drill] rto/rpo)")
    measured: int = Field(description="drills that measured it")
    met: int
    missed: int
    best: Stat | None = None
    median: Stat | None = Field(None, description="the lower median: a value one drill achieved")
    worst: Stat | None = None


class Summary(_Part):
    verdict: Literal["PASS", "FAIL"]
    verdict_line: str
    drills: int
    passed: int
    failed: int
    unauthentic: int = Field(description="drill records that fail authentication")
    rto: ObjectiveSummary
    rpo: ObjectiveSummary
    cadence_missing: int
    cadence_due: int
    backups: int
    backups_failed: int | None = Field(
        description="failed backup runs; None: unknown (the primary repository, which keeps the"
        " job records, cannot be read)"
    )


class PhaseRow(_Part):
    name: str
    seconds: float
    detail: str = ""


class CheckRow(_Part):
    name: str
    kind: str
    ok: bool
    seconds: float
    detail: str = ""


class ObjectiveRow(_Part):
    target_seconds: float | None
    achieved_seconds: float | None
    met: bool | None


class DrillRow(_Part):
    id: str
    authentic: bool
    error: str | None = Field(None, description="why the record cannot be trusted")
    started_at: datetime | None = None
    kind: str | None = None
    scenario: str | None = None
    started_by: str | None = None
    host: str | None = None
    backup: str | None = Field(None, description="the backup label restored")
    target: str | None = Field(None, description="recovery target: 'latest', 'time ...'")
    point_reason: str | None = None
    repository: str | None = None
    phases: list[PhaseRow] = Field(default_factory=list)
    rto: ObjectiveRow | None = None
    rpo: ObjectiveRow | None = None
    rpo_method: str | None = None
    recovered_time: datetime | None = None
    checks: list[CheckRow] = Field(default_factory=list)
    outcome: Literal["PASS", "FAIL"] | None = None
    failure: str | None = None
    reason: str = ""
    findings: list[str] = Field(default_factory=list, description="note ids")
    pg_version: str | None = None
    restored_bytes: int | None = None
    wal_segments: int | None = Field(None, description="WAL segments fetched during recovery")
    predicted_seconds: float | None = Field(
        None, description="restore --plan's prediction of restore + start, made before the drill"
    )
    restore_seconds: float | None = Field(
        None, description="what restore + start took (the restore and wal-replay+start phases)"
    )


class CadenceItem(_Part):
    kind: str
    period: str
    start: datetime
    end: datetime
    status: Literal["passed", "failed", "missing", "due"] = Field(
        description="passed: a drill passed; failed: drills ran, none passed; missing: the period"
        " ended without a drill; due: the period has not ended yet"
    )
    drills: list[str] = Field(default_factory=list, description="drill ids that count")


class BackupRow(_Part):
    label: str
    type: str
    start: datetime
    stop: datetime
    duration_seconds: float
    size: int
    stored: int
    copies: int = Field(description="copies, the live database included")
    media: int
    offsite: int
    rule_3_2_1: bool
    repos: list[str]


class WeekRow(_Part):
    week: str = Field(description="ISO week, '2026-W41'")
    start: datetime
    full: int
    diff: int
    incr: int
    failed: int | None
    size: int
    stored: int
    labels: list[str]


class AgePoint(_Part):
    """The newest backup's age just before ``at``: the longest exposure up to then."""

    at: datetime
    age_seconds: float
    backup: str | None = Field(description="the newest backup until then")


class BackupFailure(_Part):
    job: str
    time: datetime
    exit_code: int
    error: str
    record: str


class Backups(_Part):
    items: list[BackupRow]
    weeks: list[WeekRow]
    failures_recorded: bool = Field(description="false: the primary's job records were unreadable")
    failures: list[BackupFailure] = Field(default_factory=list)
    damaged: list[dict[str, str]] = Field(default_factory=list, description="label, reason")
    newest_age: list[AgePoint]
    worst_age: AgePoint | None = None
    rpo_target_seconds: float | None


class RepositoryCopies(_Part):
    name: str
    media: str
    offsite: bool
    object_lock: str | None
    backups: int = Field(description="backups of the period it holds")
    wal_segments: int
    newest_wal: str | None
    newest_wal_at: datetime | None
    wal_lag: int | None = Field(
        None, description="WAL files the primary (first configured) repository holds and it lacks"
    )


class ExposurePoint(_Part):
    """A repository's newest-WAL age as a drill measured it."""

    drill: str
    at: datetime
    repo: str
    wal_age_seconds: float | None
    backup_age_seconds: float | None


class Copies(_Part):
    passing: int
    failing: int
    repositories: list[RepositoryCopies]
    exposure: list[ExposurePoint]


class VerifyRun(_Part):
    repo: str
    backup: str
    time: datetime
    ok: bool
    damaged_files: int
    repaired: bool = Field(description="a later verification of the same copy found it sound")
    record: str


class Integrity(_Part):
    runs: int
    failed_runs: list[VerifyRun]
    passed_runs: int
    verified_backups: int
    unverified: list[str] = Field(description="backups of the period no repository verified")


class KeyVersion(_Part):
    provider: str
    key: str
    version: int | None
    sets: int = Field(description="record sets (backups, WAL periods, drills) it wraps")
    first_used_by: str
    first_used_at: datetime | None
    rotated_in_period: bool


class Keys(_Part):
    versions: list[KeyVersion]
    sets: int
    escrowed: int
    escrow_missing: list[str] = Field(description="record sets without an escrow copy")


class FindingRow(_Part):
    id: str
    authentic: bool
    error: str | None = None
    drill: str | None = None
    finding: str = ""
    action: str = ""
    owner: str = ""
    written_at: datetime | None = None
    written_by: str | None = None


class SignoffRow(_Part):
    id: str
    authentic: bool
    error: str | None = None
    period: str | None = None
    by: str | None = None
    statement: str = ""
    written_at: datetime | None = None


class Report(_Part):
    schema_version: int = SCHEMA_VERSION
    title: str
    period: Span
    generated_at: datetime
    source: Source
    targets: dict[str, float] = Field(description="rto_seconds, rpo_seconds")
    policy: dict[str, str] = Field(description="drill kind -> cadence")
    summary: Summary
    drills: list[DrillRow]
    cadence: list[CadenceItem]
    backups: Backups
    copies: Copies
    integrity: Integrity
    keys: Keys
    findings: list[FindingRow]
    signoffs: list[SignoffRow]


def json_schema() -> dict[str, object]:
    """The JSON Schema (draft 2020-12) of ``--format json`` (docs/report.schema.json)."""
    schema: dict[str, object] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "drkit report --format json; written by drkit.report.model.json_schema()",
    }
    schema.update(Report.model_json_schema())
    return schema
