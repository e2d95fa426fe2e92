"""A repository's history made quickly: backups and drills with the times a test chooses.

The report reads times from manifests and drill records, never from the wall clock, so a quarter
(or a year) of history is seeded in seconds: synthetic manifests (a few files, sizes and
durations chosen here) sealed like real ones, and drill records written with
``Repository.write_drill_record``. Real backups, where a test needs them, come from ``drkit
backup`` as usual and sit beside these.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from drkit.repo.drills import (
    CheckResult,
    DrillKind,
    DrillOutcome,
    DrillRecord,
    Exposure,
    FailureKind,
    Objective,
    Phase,
    RestorePoint,
    RpoDetail,
    new_drill_id,
)
from drkit.repo.label import BackupLabel, BackupType
from drkit.repo.manifest import BackupStats, FileEntry, Manifest
from drkit.repo.repository import Repository


@dataclass(frozen=True)
class SeededBackup:
    label: str
    start: datetime
    stop: datetime
    size: int
    stored: int


def seed_backup(
    repo: Repository,
    kind: BackupType,
    start: datetime,
    *,
    full: BackupLabel | None = None,
    seconds: float = 60.0,
    size: int = 64 << 20,
    stored: int = 16 << 20,
    system_identifier: str | None = None,
    files: int = 4,
    key_record: dict[str, object] | None = None,
    dek: bytes | None = None,
) -> SeededBackup:
    """A listed backup of ``kind`` started at ``start`` (its manifest and key record only: it
    restores nothing). Pass ``key_record``/``dek`` from one ``repo.keys.new_data_key()`` to seed
    thousands quickly."""
    label = BackupLabel.new(kind, start, full)
    if system_identifier is None:  # the repository's own: a manifest of another is refused
        system_identifier = repo.check().system_identifier
    if key_record is None or dek is None:
        data_key = repo.keys.new_data_key()
        key_record, dek = data_key.record, data_key.plaintext
    record_key = repo.write_key_record(label, key_record, dek)
    stop = start + timedelta(seconds=seconds)
    manifest = Manifest(
        label=str(label),
        type=str(kind),
        parent=None if kind is BackupType.FULL else (full.text if full else None),
        drkit_version="0.test",
        start_time=start,
        stop_time=stop,
        start_lsn="0/2000028",
        stop_lsn="0/2000100",
        timeline=1,
        start_wal="000000010000000000000002",
        stop_wal="000000010000000000000002",
        pg_version_num=150000,
        system_identifier=system_identifier,
        wal_segment_size=16 << 20,
        data_checksums=True,
        chain=[] if full is None else [full.text],
        key_record=record_key,
        owner="postgres",
        group="postgres",
        tablespaces=[],
        directories=[],
        links=[],
        files=[
            FileEntry(
                path=f"base/5/{16384 + i}",
                size=size // files,
                mode=0o600,
                mtime=start.timestamp(),
                sha256="0" * 64,
                object=f"backup/{label}/data/000000",
                offset=0,
                length=stored // files,
            )
            for i in range(files)
        ],
        objects=[],
        stats=BackupStats(files=files, size=size, stored=stored, duration_s=seconds),
    )
    repo.write_manifest(manifest, dek)
    return SeededBackup(str(label), start, stop, size, stored)


def drill_record(
    started: datetime,
    *,
    kind: DrillKind = DrillKind.RESTORE_TEST,
    backup: str = "20261001-010000F",
    rto: float = 600.0,
    rpo: float = 120.0,
    rto_target: float = 4 * 3600.0,
    rpo_target: float = 3600.0,
    scenario: str | None = None,
    repository: str = "local",
    failed_check: str | None = None,
) -> DrillRecord:
    """A drill record as a drill of ``kind`` started at ``started`` would write it."""
    checks = [
        CheckResult(name="amcheck", kind="amcheck", ok=True, seconds=12.5, detail="3 databases"),
        CheckResult(
            name="orders",
            kind="sql",
            ok=failed_check is None,
            seconds=0.2,
            detail="count 1200 >= 1000" if failed_check is None else failed_check,
        ),
    ]
    rto_met, rpo_met = rto <= rto_target, rpo <= rpo_target
    failure = None
    if failed_check is not None:
        failure = FailureKind.CHECK_FAILED
    elif not (rto_met and rpo_met):
        failure = FailureKind.TARGET_MISSED
    return DrillRecord(
        id=new_drill_id(started),
        kind=kind,
        scenario=scenario,
        started_at=started,
        finished_at=started + timedelta(seconds=rto + 5),
        started_by="scheduler",
        host="db1",
        drkit_version="0.test",
        pg_version="15.10",
        repository=repository,
        repositories_allowed=[repository],
        restore_point=RestorePoint(backup=backup, target_kind="latest", reason="newest backup"),
        phases=[
            Phase(name="plan", seconds=0.4),
            Phase(name="restore", seconds=rto * 0.6),
            Phase(name="wal-replay+start", seconds=rto * 0.3),
            Phase(name="checks", seconds=rto * 0.1 - 0.4),
            Phase(name="teardown", seconds=2.0),
        ],
        rto=Objective(target_seconds=rto_target, achieved_seconds=rto, met=rto_met),
        rpo=Objective(target_seconds=rpo_target, achieved_seconds=rpo, met=rpo_met),
        rpo_detail=RpoDetail(
            method="heartbeat",
            disaster_time=started,
            recovered_time=started - timedelta(seconds=rpo),
        ),
        exposure=[
            Exposure(
                repo=repository,
                newest_backup=backup,
                newest_backup_age_seconds=1800.0,
                newest_wal="000000010000000000000009",
                newest_wal_age_seconds=rpo * 0.8,
            )
        ],
        checks=checks,
        restored_bytes=3 << 30,
        wal_segments=12,
        predicted_seconds=round(rto * 0.85, 1),
        outcome=DrillOutcome.FAIL if failure else DrillOutcome.PASS,
        failure=failure,
        reason="" if failure is None else (failed_check or "RTO or RPO target missed"),
    )


def at(text: str) -> datetime:
    """'2026-10-05 03:00' -> that instant in UTC."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def seed_backups(
    repos: list[Repository],
    start: datetime,
    end: datetime,
    *,
    every: timedelta = timedelta(hours=1),
    full_every: timedelta = timedelta(days=7),
    seed: int = 7,
) -> list[SeededBackup]:
    """A backup every ``every`` from ``start`` to ``end``: a full every ``full_every``,
    incrementals between, with sizes and durations that vary a little (deterministically), each
    written into every repository of ``repos`` (as if replicated). One data key for all: cheap."""
    rng = random.Random(seed)
    data_key = repos[0].keys.new_data_key()
    identifiers = [repo.check().system_identifier for repo in repos]
    made: list[SeededBackup] = []
    full: BackupLabel | None = None
    last_full = start - full_every
    at_ = start
    while at_ < end:
        if full is None or at_ - last_full >= full_every:
            kind, base, seconds, size = BackupType.FULL, None, 540 + rng.random() * 240, 2 << 30
        else:
            kind, base, seconds, size = BackupType.INCR, full, 20 + rng.random() * 40, 0
            size = int((40 + rng.random() * 80) * (1 << 20))
        stored = int(size * (0.22 + rng.random() * 0.06))
        for repo, system_identifier in zip(repos, identifiers, strict=True):
            backup = seed_backup(
                repo,
                kind,
                at_,
                full=base,
                seconds=seconds,
                size=size,
                stored=stored,
                key_record=data_key.record,
                dek=data_key.plaintext,
                system_identifier=system_identifier,
            )
        made.append(backup)
        if kind is BackupType.FULL:
            full, last_full = BackupLabel(backup.label), at_
        at_ += every
    return made


def seed_verify(repo: Repository, label: str, when: datetime, ok: bool, damaged: int = 0) -> None:
    """A verification record of ``label`` as ``drkit verify`` at ``when`` would write it."""
    key = f"backup/{label}/verify/{when.strftime('%Y%m%dT%H%M%S.%fZ')}.json"
    record = {"ok": ok, "damaged_files": damaged, "time": when.isoformat()}
    repo.storage.write_bytes(key, json.dumps(record).encode())
