"""`drkit drill list`: the drills the repositories have records of, merged by id.

Every drill writes its record into every repository, and `drkit replicate` copies records to the
repositories that missed one, so any single repository normally holds the whole history. This
operation reads them all and merges by id: a drill is shown when any repository holds a copy that
authenticates, with the repositories that do. A copy that fails authentication or parsing is a
warning naming the repository and the reason; a drill with no authentic copy at all is listed as
such. A repository that cannot be read is a warning while another one can; when none can, the
first error is raised (unless this host has queued records to show). Records queued on this
host (``drkit.drill.queue``: no repository could take them yet) are listed too, as queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.drill.queue import QueuedRecord, RecordQueue
from drkit.errors import (
    DrillRecordUnauthentic,
    DrkitError,
    RepositoryUnreachable,
)
from drkit.repo.drills import DrillRecord
from drkit.repo.open import open_repository, select_repositories
from drkit.result import OperationResult


@dataclass
class ListedDrill:
    id: str
    record: DrillRecord | None = None  # from the first repository whose copy authenticates
    repositories: list[str] = field(default_factory=list)  # those holding an authentic copy
    errors: dict[str, str] = field(default_factory=dict)  # repository -> why its copy fails

    @property
    def authentic(self) -> bool:
        return self.record is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "authentic": self.authentic,
            "record": self.record.model_dump(mode="json") if self.record else None,
            "repositories": self.repositories,
            "errors": self.errors,
        }


@dataclass(kw_only=True)
class DrillList(OperationResult):
    drills: list[ListedDrill] = field(default_factory=list)  # oldest first
    repositories: list[str] = field(default_factory=list)  # those read
    queued: list[ListedDrill] = field(default_factory=list)  # on this host, in no repository yet

    def _data(self) -> dict[str, Any]:
        return {
            "drills": [d.as_dict() for d in self.drills],
            "repositories": self.repositories,
            "queued": [d.as_dict() for d in self.queued],
        }


class DrillListOperation:
    """Reads the drill records of every repository (or of ``repo`` alone)."""

    def __init__(self, settings: Settings, repo: str | None = None) -> None:
        self.settings = settings
        self.repo_name = repo

    def run(self) -> DrillList:
        result = DrillList()
        drills: dict[str, ListedDrill] = {}
        first_error: DrkitError | None = None
        for repo_settings in select_repositories(self.settings, self.repo_name):
            try:
                repo = open_repository(self.settings, repo_settings.name)
                repo.check()
                entries = repo.drill_records()
            except DrkitError as exc:
                if self.repo_name is not None:
                    raise
                first_error = first_error or exc
                result.warnings.append(
                    RepositoryUnreachable(
                        f"repository '{repo_settings.name}' could not be read: {exc.message}"
                    )
                )
                continue
            result.repositories.append(repo.name)
            for entry in entries:
                listed = drills.setdefault(entry.id, ListedDrill(entry.id))
                if entry.record is not None:
                    listed.record = listed.record or entry.record
                    listed.repositories.append(repo.name)
                else:
                    listed.errors[repo.name] = entry.error or "unreadable"
                    result.warnings.append(
                        DrillRecordUnauthentic(
                            f"repository '{repo.name}': {entry.error}",
                            hint="a record that fails authentication was damaged or tampered"
                            " with; compare with the other repositories' copies",
                        )
                    )
        for queued in RecordQueue(self.settings.drill.sandbox).records():
            if queued.id in drills:
                continue  # written meanwhile; the next drill drops it from the queue
            result.queued.append(ListedDrill(queued.id, queued.record, errors=_queue_error(queued)))
        if not result.repositories and not result.queued and first_error is not None:
            raise first_error
        result.drills = [drills[drill_id] for drill_id in sorted(drills)]
        return result


def _queue_error(entry: QueuedRecord) -> dict[str, str]:
    return {"queue": entry.error} if entry.error else {}
