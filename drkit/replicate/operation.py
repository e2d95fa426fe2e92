"""`drkit replicate`: catch every other repository up with the primary, verify the copies.

The copying itself is the copy service below the operations (drkit/repo/copies.py), which a
backup's fan-out and the async WAL pusher use too. Drill records are caught up here too, every
way (drkit/repo/drill_copies.py): the repository that missed a drill's record may be the primary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from drkit.config.settings import Settings
from drkit.errors import (
    BackupNotCopied,
    DrillRecordNotWritten,
    DrkitError,
    DrkitWarning,
    LeaseTakenOver,
)
from drkit.repo.copies import CopyService, RepoReplication
from drkit.repo.drill_copies import DrillRecordSync, sync_drill_records
from drkit.repo.lease import TAKEN_OVER_HINT
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.repo.retention import drill_records_kept_since, policy_from
from drkit.result import OperationResult


@dataclass(kw_only=True)
class ReplicateResult(OperationResult):
    """What was copied to each other repository. A repository that could not be brought up to
    date is a BackupNotCopied warning (what it lacks is safe in the primary), one that missed
    drill records a DrillRecordNotWritten, a target's lease taken over from a host whose lease
    expired a LeaseTakenOver. ``phases``: copies (backups and WAL), drills."""

    repos: list[RepoReplication] = field(default_factory=list)
    drills: DrillRecordSync = field(default_factory=DrillRecordSync)

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.repos) and not self.drills.errors

    @property
    def failure(self) -> str | None:
        """Why a run with this result counts as a failed job; None when it succeeded."""
        failed = [f"'{r.repo}': {r.error}" for r in self.repos if r.error is not None]
        failed += [f"'{name}' (drill records): {e}" for name, e in self.drill_errors().items()]
        return f"replication failed for {', '.join(failed)}" if failed else None

    def drill_errors(self) -> dict[str, str]:
        """Drill records not caught up, but in a repository that failed as a whole (one cause,
        reported once)."""
        failed = {r.repo for r in self.repos if r.error is not None}
        return {n: e for n, e in self.drills.errors.items() if n not in failed}

    def _data(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repos": [asdict(r) for r in self.repos],
            "drills": asdict(self.drills),
        }


def replicate_repositories(settings: Settings) -> ReplicateResult:
    """Copy every missing backup and the WAL to each other repository, and every drill record
    to each repository lacking it."""
    return ReplicateOperation(settings).run()


class ReplicateOperation:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> ReplicateResult:
        result = ReplicateResult()

        # Backups and WAL, from the primary to the others
        with result.phase("copies"):
            result.repos = CopyService(self.settings).catch_up().repos

        # Drill records, to every repository lacking one (except those its retention drops)
        with result.phase("drills"):
            result.drills = self._drill_records()

        # What is not caught up yet, as warnings
        result.warnings = _warnings(result)
        return result

    def _drill_records(self) -> DrillRecordSync:
        now = datetime.now(UTC)
        repos: list[Repository] = []
        unreadable: dict[str, str] = {}
        keep_since: dict[str, datetime | None] = {}
        for repo_settings in self.settings.repo:
            retention = repo_settings.retention or self.settings.retention
            keep_since[repo_settings.name] = (
                drill_records_kept_since(policy_from(retention), now) if retention else None
            )
            try:
                repo = open_repository(self.settings, repo_settings.name)
                repo.check()
            except DrkitError as exc:
                unreadable[repo_settings.name] = exc.message
                continue
            repos.append(repo)
        sync = sync_drill_records(repos, keep_since)
        sync.errors.update(unreadable)
        return sync


def _warnings(result: ReplicateResult) -> list[DrkitWarning]:
    found: list[DrkitWarning] = []
    for r in result.repos:
        if r.lease_taken_over is not None:
            found.append(LeaseTakenOver(r.lease_taken_over, hint=TAKEN_OVER_HINT))
        if r.error is not None:
            hint = (
                "another backup, prune or replicate is writing there, on this host or another;"
                " the next 'drkit replicate' catches up"
                if r.locked
                else "the backups and WAL are safe in the primary; 'drkit replicate' copies"
                " them once the repository is back"
            )
            found.append(BackupNotCopied(f"repository '{r.repo}' not caught up: {r.error}", hint))
    for name, error in result.drill_errors().items():
        found.append(
            DrillRecordNotWritten(f"repository '{name}': drill records not caught up: {error}")
        )
    return found
