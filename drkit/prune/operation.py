"""drkit prune: apply each repository's retention policy, deleting in the reverse of write order.

A backup is written data -> key record -> manifest, and is listed exactly when its manifest
exists. Prune deletes backups newest first (a diff/incr before the backups it needs), and each
one manifest first, then its other records, then its key records, then its data. So a prune
killed at any instant leaves every listed backup whole: the backup being deleted is either still
listed with all its objects, or no longer listed (its remaining objects are a leftover, removed by
the next prune or backup).

Object Lock: an object whose retention has not expired is never forced. It is skipped and
reported (warning exit code). When the locked object is a manifest, the backup stays listed, so
nothing else of it is deleted, and neither is any backup it needs. WAL is cut only below what the
backups still listed at the end need, so a locked backup keeps its WAL too.

Prune holds the repository's backup lock and lease (drkit/repo/lease.py) for its whole run, so
it never races a backup, on this host or another. A
dry run lists what would go and deletes nothing; it cannot know which objects are locked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drkit.config.settings import RepoSettings, Settings
from drkit.errors import (
    BackupNotFound,
    BackupSkipped,
    ConfigError,
    DrkitError,
    IntegrityError,
    ObjectLocked,
    ObjectsLockedSkipped,
)
from drkit.repo.drills import drill_time, is_drill_id
from drkit.repo.label import BackupLabel
from drkit.repo.lease import RepositoryLease, repository_lease
from drkit.repo.open import open_repository, repo_location, select_repositories
from drkit.repo.repository import Repository
from drkit.repo.retention import (
    BackupFacts,
    RetentionPolicy,
    WalCut,
    backup_facts,
    decide,
    drill_records_kept_since,
    newest_proven,
    policy_from,
    stale_leftovers,
    wal_cuts,
)
from drkit.repo.wal_archive import WalArchive
from drkit.repo.wal_names import parse_wal_name
from drkit.result import OperationResult, Stopwatch


@dataclass
class Skipped:
    """An object that could not be deleted because a retention lock protects it."""

    key: str
    reason: str
    until: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        until = self.until.isoformat() if self.until else None
        return {"key": self.key, "reason": self.reason, "until": until}


@dataclass
class RepoPrune:
    """What prune did (or, in a dry run, would do) in one repository."""

    repo: str
    dry_run: bool
    policy: str | None = None  # None: the repository has no retention policy
    kept: dict[str, list[str]] = field(default_factory=dict)  # label -> why, oldest first
    deleted: list[str] = field(default_factory=list)  # backups no longer listed, newest first
    held: dict[str, str] = field(default_factory=dict)  # label the policy drops -> why it stays
    leftovers: list[str] = field(default_factory=list)  # incomplete backups removed
    wal_cuts: list[WalCut] = field(default_factory=list)
    wal_deleted: list[str] = field(default_factory=list)  # archived WAL files, oldest first
    drills_kept_since: datetime | None = None  # drill records of drills started before go
    drills_deleted: list[str] = field(default_factory=list)  # drill ids, oldest first
    skipped: list[Skipped] = field(default_factory=list)
    # label -> why its manifest cannot be trusted: left out of every decision, never deleted
    unreadable: dict[str, str] = field(default_factory=dict)
    dependents: list[str] = field(default_factory=list)  # --backup: the backups that need it
    error: DrkitError | None = None

    @property
    def warning(self) -> bool:
        """Something the policy dropped stays (retention locks: ObjectsLockedSkipped), or a
        backup was left out (BackupSkipped)."""
        return bool(self.skipped or self.held or self.unreadable)

    def as_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "dry_run": self.dry_run,
            "policy": self.policy,
            "kept": [{"label": k, "reasons": v} for k, v in self.kept.items()],
            "deleted": self.deleted,
            "held": [{"label": k, "reason": v} for k, v in self.held.items()],
            "leftovers": self.leftovers,
            "wal_cuts": [{"timeline": c.timeline, "below": c.below} for c in self.wal_cuts],
            "wal_deleted": self.wal_deleted,
            "drills_kept_since": (
                self.drills_kept_since.isoformat() if self.drills_kept_since else None
            ),
            "drills_deleted": self.drills_deleted,
            "skipped": [s.as_dict() for s in self.skipped],
            "unreadable": [{"label": k, "reason": v} for k, v in self.unreadable.items()],
            "dependents": self.dependents,
            "error": self.error.message if self.error else None,
        }


@dataclass
class PruneReport(OperationResult):
    """What prune did per repository. A repository that fails does not stop the others: its
    error is kept in its entry and is the exit code. Warnings: ObjectsLockedSkipped,
    BackupSkipped.
    ``phases``: prune (every selected repository)."""

    dry_run: bool
    repos: list[RepoPrune] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The first failed repository's error code, else the warnings' code, else 0."""
        for r in self.repos:
            if r.error is not None:
                return r.error.exit_code
        return super().exit_code

    @property
    def failure(self) -> str | None:
        """Why a run with this result counts as a failed job (a repository failed); None when
        it succeeded. Warnings are no failure: objects under a retention lock are kept by
        design, and the next run deletes them once the lock ends."""
        for r in self.repos:
            if r.error is not None:
                return f"prune failed for repository '{r.repo}': {r.error.message}"
        return None

    def _data(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "repos": [r.as_dict() for r in self.repos]}


def prune_repositories(
    settings: Settings,
    repo: str | None = None,
    dry_run: bool = False,
    *,
    backup: str | None = None,
    with_dependents: bool = False,
) -> PruneReport:
    """Apply each selected repository's retention policy (``repo``: only that one); with
    ``backup``, delete that one backup instead (prune/one_backup.py)."""
    return PruneOperation(
        settings, repo, dry_run, backup=backup, with_dependents=with_dependents
    ).run()


class PruneOperation:
    """`drkit prune`: each selected repository with its own policy (or the default one)."""

    def __init__(
        self,
        settings: Settings,
        repo: str | None = None,
        dry_run: bool = False,
        now: datetime | None = None,
        *,
        backup: str | None = None,
        with_dependents: bool = False,
    ) -> None:
        self.settings = settings
        self.repo_name = repo
        self.dry_run = dry_run
        self.now = now
        self.backup = backup
        self.with_dependents = with_dependents

    def run(self) -> PruneReport:
        if self.backup is not None:
            return self._delete_backup(self.backup)
        selected = select_repositories(self.settings, self.repo_name)
        if not any(r.retention or self.settings.retention for r in selected):
            raise ConfigError(
                "no retention policy is configured"
                + (f" for repository '{self.repo_name}'" if self.repo_name else ""),
                hint="add a [retention] section (e.g. full = 4) or a retention table to the"
                " repository; docs/retention.md",
            )
        now = self.now or datetime.now(UTC)
        report = PruneReport(dry_run=self.dry_run)
        clock = Stopwatch(report.phases)
        for repo_settings in selected:
            result = RepoPrune(repo_settings.name, self.dry_run)
            report.repos.append(result)
            retention = repo_settings.retention or self.settings.retention
            if retention is None:
                continue
            policy = policy_from(retention)
            result.policy = policy.describe()
            try:
                repo = open_repository(self.settings, repo_settings.name)
                with self._lock(repo_settings, repo) as lease:
                    prune_repository(repo, policy, now, self.dry_run, result, lease)
                    if lease is not None and lease.taken_over is not None:
                        report.warnings.append(lease.taken_over)
            except DrkitError as exc:
                result.error = exc
        clock.lap("prune")
        _collect_warnings(report)
        return report

    def _delete_backup(self, label: str) -> PruneReport:
        """Delete one backup from every selected repository that lists it."""
        from drkit.prune.one_backup import delete_one_backup

        report = PruneReport(dry_run=self.dry_run)
        clock = Stopwatch(report.phases)
        for repo_settings in select_repositories(self.settings, self.repo_name):
            result = RepoPrune(repo_settings.name, self.dry_run, policy=f"backup {label}")
            try:
                repo = open_repository(self.settings, repo_settings.name)
                with self._lock(repo_settings, repo) as lease:
                    delete_one_backup(
                        repo, label, self.with_dependents, self.dry_run, result, lease
                    )
                    if lease is not None and lease.taken_over is not None:
                        report.warnings.append(lease.taken_over)
            except BackupNotFound:
                continue  # not copied there: nothing to delete
            except DrkitError as exc:
                result.error = exc
            report.repos.append(result)
        clock.lap("prune")
        if not report.repos:
            raise BackupNotFound(
                f"backup '{label}' is in no repository"
                + (f" named '{self.repo_name}'" if self.repo_name else ""),
                hint="'drkit info' lists the backups",
            )
        _collect_warnings(report)
        return report

    @contextmanager
    def _lock(self, settings: RepoSettings, repo: Repository) -> Iterator[RepositoryLease | None]:
        """The repository's backup lock and lease (a dry run deletes nothing and takes none)."""
        if self.dry_run:
            yield None
            return
        with repository_lease(
            self.settings, repo, repo_location(settings), "backup", "prune"
        ) as lease:
            yield lease


def _collect_warnings(report: PruneReport) -> None:
    """The repositories' locked and unreadable objects, as typed warnings on the report."""
    for r in report.repos:
        report.warnings += [
            ObjectsLockedSkipped(f"skipped '{s.key}': {s.reason}") for s in r.skipped
        ]
        report.warnings += [
            ObjectsLockedSkipped(f"backup '{label}' was not deleted: {why}")
            for label, why in r.held.items()
        ]
        report.warnings += [
            BackupSkipped(f"backup '{label}' was left out of retention and kept: {why}")
            for label, why in r.unreadable.items()
        ]


def prune_repository(
    repo: Repository,
    policy: RetentionPolicy,
    now: datetime,
    dry_run: bool = False,
    result: RepoPrune | None = None,
    lease: RepositoryLease | None = None,
) -> RepoPrune:
    """Apply ``policy`` to ``repo`` at time ``now``; the caller holds the backup lock and
    ``lease`` (checked before each backup is deleted; it decides which leftovers may go)."""
    result = result or RepoPrune(repo.name, dry_run)
    result.policy = policy.describe()

    # Load the catalog: every listed backup's facts, the leftovers, the archived timelines
    repo.check()
    incomplete = repo.incomplete()
    facts = readable_facts(repo, result)
    archive = WalArchive(repo)
    timelines = archive.timelines()
    proven = newest_proven(e.record for e in repo.drill_records() if e.record is not None)

    # Decide what stays
    decision = decide(list(facts.values()), policy, now, timelines, proven)
    result.drills_kept_since = drill_records_kept_since(policy, now)
    drills = {
        drill_id: keys
        for drill_id, keys in repo.drill_objects().items()
        if is_drill_id(drill_id) and drill_time(drill_id) < result.drills_kept_since
    }
    result.kept = {label: decision.reasons[label] for label in decision.keep}
    newest = BackupLabel(decision.keep[-1]) if decision.keep else None
    leftovers = [
        label
        for label in stale_leftovers(incomplete, newest)
        if lease is None or lease.may_remove(BackupLabel(label))
    ]
    if dry_run:
        result.deleted = list(reversed(decision.delete))
        result.leftovers = leftovers
        result.wal_cuts = decision.wal
        result.wal_deleted = _covered(archive, decision.wal)
        result.drills_deleted = list(drills)
        return result

    # Delete backups newest first, so no backup goes before one that needs it
    for label in reversed(decision.delete):
        if lease is not None:
            lease.check()
        if label in result.held:
            hold_needs(result, facts, facts[label].needs, label)
        elif delete_backup(repo, label, result):
            result.deleted.append(label)
        else:
            result.held[label] = "its manifest is under a retention lock"
            hold_needs(result, facts, facts[label].needs, label)
    for label in result.held:
        result.kept[label] = [result.held[label]]
    result.kept = {k: result.kept[k] for k in sorted(result.kept)}

    # Remove the leftovers of backups that never completed
    for label in leftovers:
        if lease is not None:
            lease.check()
        _delete_objects(repo, BackupLabel(label), result)
        result.leftovers.append(label)

    # Delete the WAL that no backup still listed needs, oldest first
    remaining = [f for label, f in facts.items() if label not in result.deleted]
    result.wal_cuts = wal_cuts(remaining, timelines)
    for name in _covered(archive, result.wal_cuts):
        if _delete(repo, parse_wal_name(name).key, result):
            result.wal_deleted.append(name)

    # Delete the drill records retention no longer keeps: the record, then its key records
    # (a locked record keeps its key, so it stays readable)
    for drill_id, keys in drills.items():
        if all(_delete(repo, key, result) for key in keys):  # stops at the first locked one
            result.drills_deleted.append(drill_id)
    return result


def readable_facts(repo: Repository, result: RepoPrune) -> dict[str, BackupFacts]:
    """The facts of every backup whose manifest authenticates. One that does not (damaged, or
    added by someone who cannot seal one) counts for nothing: it neither makes an older backup
    redundant nor is deleted, and is reported."""
    facts = {}
    for label in repo.backups():
        try:
            facts[str(label)] = backup_facts(repo, label)
        except IntegrityError as exc:
            result.unreadable[str(label)] = exc.message
    return facts


def hold_needs(
    result: RepoPrune, facts: dict[str, BackupFacts], needs: frozenset[str], by: str
) -> None:
    for needed in needs:
        if needed in facts and needed not in result.kept:
            result.held.setdefault(needed, f"needed by {by}, which stays")


def delete_backup(repo: Repository, label: str, result: RepoPrune) -> bool:
    """Delete one backup, manifest first; False (nothing deleted) when the manifest is locked."""
    backup = BackupLabel(label)
    if not _delete(repo, Repository.manifest_key(backup), result):
        return False
    _delete_objects(repo, backup, result)
    return True


def _delete_objects(repo: Repository, label: BackupLabel, result: RepoPrune) -> None:
    """Every object of an unlisted backup, in ``Repository.deletion_order``; locked objects are
    skipped."""
    for key in repo.deletion_order(label):
        _delete(repo, key, result)


def _delete(repo: Repository, key: str, result: RepoPrune) -> bool:
    try:
        repo.delete(key)
    except ObjectLocked as exc:
        result.skipped.append(Skipped(key, exc.message, exc.until))
        return False
    return True


def _covered(archive: WalArchive, cuts: list[WalCut]) -> list[str]:
    """Archived file names the cuts cover, oldest first per timeline."""
    names: list[str] = []
    for cut in cuts:
        names += [n for n in archive.files(cut.timeline) if cut.covers(n)]
    return names
