"""`drkit replicate`: catch every other repository up with the primary, verify the copies.

The copying itself is the copy service below the operations (drkit/repo/copies.py), which a
backup's fan-out and the async WAL pusher use too. Drill records are caught up here too, every
way (drkit/repo/drill_copies.py): the repository that missed a drill's record may be the primary.
"""

from __future__ import annotations

from datetime import UTC, datetime

from drkit.config.settings import Settings
from drkit.errors import DrkitError
from drkit.repo.copies import CopyService, ReplicationReport
from drkit.repo.drill_copies import DrillRecordSync, sync_drill_records
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.repo.retention import drill_records_kept_since, policy_from


class ReplicateOperation:
    """Copy every missing backup and the WAL to each other repository, and every drill record
    to each repository lacking it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> ReplicationReport:
        # Backups and WAL, from the primary to the others
        report = CopyService(self.settings).catch_up()

        # Drill records, to every repository lacking one (except those its retention drops)
        report.drills = self._drill_records()
        return report

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
