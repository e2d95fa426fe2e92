"""Describe a repository: its backups (derived by listing manifests) and any leftovers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.errors import (
    DrkitError,
    DrkitWarning,
    IncompleteBackup,
    IntegrityError,
    NoRetention,
    RepositoryUnreachable,
    Rule321Failed,
    WalArchiveGap,
)
from drkit.info.copies import CopyMap, CopyStatus
from drkit.repo.drills import DrillRecord
from drkit.repo.events import EVENT_PREFIX, JobTimes, job_times
from drkit.repo.lease import live_holder
from drkit.repo.lock import LockHolder, lock_holder
from drkit.repo.manifest import Manifest
from drkit.repo.open import open_repository, open_storage, repo_location
from drkit.repo.repository import BACKUP_PREFIX, Repository
from drkit.repo.wal_archive import TimelineSummary, WalArchive
from drkit.result import OperationResult


@dataclass
class BackupSummary:
    label: str
    type: str
    parent: str | None
    start_time: str
    stop_time: str
    start_lsn: str
    stop_lsn: str
    timeline: int
    wal: str  # first..last segment stored with the backup
    pg_version_num: int
    files: int
    size: int
    stored: int
    duration_s: float
    changes: str | None  # diff/incr: "summaries", "wal" or "scan" (BackupStats.changes)
    bad_pages: int
    copies: CopyStatus | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "copies"}
        if self.copies is not None:
            data["copies"] = self.copies.as_dict()
        return data


def drill_summary(record: DrillRecord) -> dict[str, Any]:
    """The last drill as ``info`` shows it: when, the result, RTO and RPO against targets."""
    return {
        "id": record.id,
        "started_at": record.started_at.isoformat(),
        "outcome": str(record.outcome),
        "failure": str(record.failure) if record.failure else None,
        "backup": record.restore_point.backup if record.restore_point else None,
        "rto": record.rto.model_dump(),
        "rpo": record.rpo.model_dump(),
    }


@dataclass
class RepositoryInfo(OperationResult):
    """What ``info`` found. Warnings: Rule321Failed (the newest backup lacks copies, when
    3-2-1 is required), NoRetention, RepositoryUnreachable, WalArchiveGap, IncompleteBackup.
    ``phases``: backups (read every manifest), copies (list every repository), wal (summarize
    the archive), drills (the newest drill record of each repository), jobs (list the job
    records)."""

    name: str
    system_identifier: str
    format: int
    backups: list[BackupSummary] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # label -> why its manifest is unusable
    wal: list[TimelineSummary] = field(default_factory=list)  # archived WAL per timeline
    wal_lag: dict[str, int] = field(default_factory=dict)  # other repository -> WAL files behind
    unreachable: dict[str, str] = field(default_factory=dict)  # repository -> error
    # repository -> its newest drill record that authenticates (drill_summary); None: none
    last_drill: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    jobs: dict[str, JobTimes] = field(default_factory=dict)  # job -> its last runs (primary's)
    require_321: bool = True  # whether a newest backup failing 3-2-1 is a warning
    running: LockHolder | None = None  # a backup of this cluster running on this host
    running_label: str | None = None  # its label, once it has stored objects here
    running_stored: int = 0  # bytes it has stored here so far

    @property
    def status(self) -> str:
        """One line for people and monitoring: 'ok', or the problems, most severe first."""
        running = " (backup running)" if self.running is not None else ""
        if self.damaged:
            return f"error: {len(self.damaged)} backup(s) DAMAGED ({', '.join(self.damaged)})"
        if self.warnings:
            return "warning: " + "; ".join(w.message for w in self.warnings) + running
        return "ok" + running

    @property
    def exit_code(self) -> int:
        """A damaged backup is an error (13, reported after everything else was listed);
        otherwise the warnings' code."""
        return IntegrityError.exit_code if self.damaged else super().exit_code

    @property
    def rule_3_2_1(self) -> bool:
        """The cluster passes 3-2-1 when its newest backup does."""
        newest = self.backups[-1] if self.backups else None
        return bool(newest and newest.copies and newest.copies.passes)

    def _data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "system_identifier": self.system_identifier,
            "format": self.format,
            "backups": [b.as_dict() for b in self.backups],
            "incomplete": self.incomplete,
            "damaged": [{"label": k, "reason": v} for k, v in self.damaged.items()],
            "wal": [t.as_dict() for t in self.wal],
            "wal_lag": self.wal_lag,
            "unreachable": self.unreachable,
            "last_drill": self.last_drill,
            "jobs": {
                job: {
                    "last_success": t.last_ok.isoformat() if t.last_ok else None,
                    "last_failure": t.last_fail.isoformat() if t.last_fail else None,
                }
                for job, t in sorted(self.jobs.items())
            },
            "rule_3_2_1": "PASS" if self.rule_3_2_1 else "FAIL",
            "require_321": self.require_321,
            "running": _running(self),
            "status": self.status,
        }


def describe_repository(settings: Settings, repo: str | None = None) -> RepositoryInfo:
    """The backups, archived WAL and copies of ``repo`` (default: the primary repository)."""
    return InfoOperation(settings, repo).run()


class InfoOperation:
    def __init__(self, settings: Settings, repo: str | None = None) -> None:
        self.settings = settings
        self.repo_name = repo

    def run(self) -> RepositoryInfo:
        repo = open_repository(self.settings, self.repo_name)
        fmt = repo.check()
        info = RepositoryInfo(
            name=repo.name,
            system_identifier=fmt.system_identifier,
            format=fmt.format,
            require_321=self.settings.require_321,
        )

        # A backup of this cluster running on this host (it holds the lock on the primary), or
        # on another host (it holds the primary's lease)
        info.running = lock_holder(
            self.settings.lock_path, repo_location(self.settings.repo[0]), "backup"
        ) or _leased_backup(self.settings)

        # Which repository holds which backup and WAL file (3-2-1, lag)
        with info.phase("copies"):
            copies = CopyMap.scan(self.settings)
            info.unreachable = copies.unreachable
            info.wal_lag = copies.wal_lag(repo.name)

        # The backups, from their manifests, and the leftovers of incomplete ones
        with info.phase("backups"):
            manifests = []
            for label in repo.backups():
                try:
                    manifests.append(repo.load_manifest(label)[0])
                except IntegrityError as exc:  # damaged or unauthentic: list the others anyway
                    info.damaged[str(label)] = str(exc)
            info.backups = [_summary(m, copies.status(self.settings, m.label)) for m in manifests]
            info.incomplete = [str(label) for label in repo.incomplete()]
            if info.running is not None:
                _claim_running_backup(info, repo)

        # The archived WAL per timeline, with its gaps
        with info.phase("wal"):
            segment_size = manifests[-1].wal_segment_size if manifests else None
            info.wal = WalArchive(repo, segment_size=segment_size).summarize()

        # The newest drill record of each repository
        with info.phase("drills"):
            info.last_drill = self._last_drills(info.unreachable)

        # The last success and failure of each job (backups, timers' and the scheduler's runs)
        with info.phase("jobs"):
            info.jobs = self._jobs(repo)

        info.warnings = _warnings(info) + _retention_warnings(self.settings)
        return info

    def _jobs(self, repo: Repository) -> dict[str, JobTimes]:
        """From the job records in the primary repository (they are written there only)."""
        primary = self.settings.repo[0].name
        try:
            storage = repo.storage if repo.name == primary else open_storage(self.settings.repo[0])
            return job_times([o.key for o in storage.list(EVENT_PREFIX)])
        except DrkitError:
            return {}  # the primary is unreachable: 'unreachable' says so

    def _last_drills(self, unreachable: dict[str, str]) -> dict[str, dict[str, Any] | None]:
        """Per reachable repository, its newest drill record that authenticates."""
        last: dict[str, dict[str, Any] | None] = {}
        for repo_settings in self.settings.repo:
            if repo_settings.name in unreachable:
                continue
            try:
                entry = open_repository(self.settings, repo_settings.name).last_drill()
            except DrkitError as exc:
                unreachable[repo_settings.name] = exc.message
                continue
            last[repo_settings.name] = (
                drill_summary(entry.record) if entry and entry.record else None
            )
        return last


def _summary(m: Manifest, copies: CopyStatus) -> BackupSummary:
    return BackupSummary(
        label=m.label,
        type=m.type,
        parent=m.parent,
        start_time=m.start_time.isoformat(timespec="seconds"),
        stop_time=m.stop_time.isoformat(timespec="seconds"),
        start_lsn=m.start_lsn,
        stop_lsn=m.stop_lsn,
        timeline=m.timeline,
        wal=f"{m.start_wal}..{m.stop_wal}",
        pg_version_num=m.pg_version_num,
        files=m.stats.files,
        size=m.stats.size,
        stored=m.stats.stored,
        duration_s=m.stats.duration_s,
        changes=m.stats.changes,
        bad_pages=sum(len(f.bad_pages) for f in m.files),
        copies=copies,
    )


def _warnings(info: RepositoryInfo) -> list[DrkitWarning]:
    warnings: list[DrkitWarning] = [
        IncompleteBackup(f"incomplete backup '{label}' (never listed; removed by the next backup)")
        for label in info.incomplete
    ]
    for t in info.wal:
        for first, last in t.missing:
            span = first if first == last else f"{first}..{last}"
            warnings.append(
                WalArchiveGap(
                    f"WAL archive gap on timeline {t.timeline}: {span} missing",
                    hint="recovery cannot replay past it: take a new backup",
                )
            )
    warnings += [
        RepositoryUnreachable(f"repository '{name}' is unreachable: {error}")
        for name, error in info.unreachable.items()
    ]
    if info.backups and info.require_321 and not info.rule_3_2_1:
        warnings.append(
            Rule321Failed("the newest backup does not meet 3-2-1 (3 copies, 2 media, 1 offsite)")
        )
    return warnings


def _retention_warnings(settings: Settings) -> list[DrkitWarning]:
    """Without retention, prune keeps everything and the repository grows until it is full."""
    bare = [r.name for r in settings.repo if r.retention is None and settings.retention is None]
    if not bare:
        return []
    names = ", ".join(f"'{name}'" for name in bare)
    return [
        NoRetention(
            f"no retention is configured for repository {names}: 'drkit prune' keeps every"
            " backup and the repository grows until it is full",
            hint="set [retention] (e.g. full = 2 or window = '30d'), or per repository;"
            " docs/retention.md",
        )
    ]


def _claim_running_backup(info: RepositoryInfo, repo: Repository) -> None:
    """While a backup runs, the newest incomplete label (newer than every complete backup) is
    that backup, not a leftover: report its progress instead of warning about it."""
    if not info.incomplete:
        return
    newest = max(info.incomplete)
    if info.backups and newest <= max(b.label for b in info.backups):
        return
    info.incomplete.remove(newest)
    info.running_label = newest
    info.running_stored = sum(o.size for o in repo.storage.list(f"{BACKUP_PREFIX}{newest}/"))


def _leased_backup(settings: Settings) -> LockHolder | None:
    """A backup on another host holding the primary repository's lease (None when the lease
    is free, held by another operation, or cannot be read)."""
    try:
        holder = live_holder(open_storage(settings.repo[0]), "backup", settings.lease)
    except DrkitError:
        return None
    if holder is None or holder.operation != "backup" or holder.host == settings.lease.host:
        return None
    return LockHolder(holder.operation, holder.pid, holder.acquired, holder.host)


def _running(info: RepositoryInfo) -> dict[str, Any] | None:
    holder = info.running
    if holder is None:
        return None
    return {
        "operation": holder.operation,
        "pid": holder.pid,
        "host": holder.host,
        "since": holder.since.isoformat(),
        "label": info.running_label,
        "stored": info.running_stored,
    }
