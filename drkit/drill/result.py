"""What a drill is asked to do and what it gives back; ``DrillOperation`` runs it."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from drkit.drill.scenario import Scenario
from drkit.errors import DrillCheckFailed, DrillRestoreFailed, DrillTargetMissed
from drkit.repo.drills import DrillRecord, FailureKind
from drkit.restore.delta import DeltaSummary
from drkit.result import OperationResult

EXIT_CODES = {
    FailureKind.RESTORE_FAILED: DrillRestoreFailed.exit_code,
    FailureKind.CHECK_FAILED: DrillCheckFailed.exit_code,
    FailureKind.TARGET_MISSED: DrillTargetMissed.exit_code,
}


@dataclass
class DrillRequest:
    """What to drill. Command-line choices (backup, target, random, rto, rpo) win over the
    scenario's, which win over ``[drill]`` in drkit.toml."""

    scenario: Scenario | None = None
    backup: str | None = None
    target_time: str | None = None
    target_name: str | None = None
    target_lsn: str | None = None
    target_xid: str | None = None
    random: bool = False
    rto: timedelta | None = None
    rpo: timedelta | None = None
    keep: bool = False  # keep the sandbox (the server is stopped all the same)
    started_by: str = field(default_factory=lambda: f"user:{getpass.getuser()}")
    config: Path | None = None  # the drkit.toml the sandbox's restore_command reads


@dataclass(kw_only=True)
class DrillResult(OperationResult):
    """A finished drill, PASS or FAIL. ``exit_code``: 0 on PASS (or the warnings' code), 30
    restore failed, 31 check failed, 32 target missed. Warnings: RepositoryUnreachable for a
    repository the record could not be written to. ``phases``: the record's phases."""

    record: DrillRecord
    sandbox: Path | None = None  # kept for inspection (--keep), or for the next drill (reused)
    delta: DeltaSummary | None = None  # the restore into the reused sandbox: what it changed
    written: list[str] = field(default_factory=list)  # repositories holding the record
    queued: Path | None = None  # where the record waits when no repository took it
    flushed: list[str] = field(default_factory=list)  # earlier queued drills written now

    @property
    def exit_code(self) -> int:
        if self.record.failure is not None:
            return EXIT_CODES[self.record.failure]
        return super().exit_code

    def _data(self) -> dict[str, Any]:
        return {
            "outcome": str(self.record.outcome),
            "failure": str(self.record.failure) if self.record.failure else None,
            "reason": self.record.reason,
            "record": self.record.model_dump(mode="json"),
            "sandbox": str(self.sandbox) if self.sandbox else None,
            "delta": self.delta.as_dict() if self.delta else None,
            "written": self.written,
            "queued": str(self.queued) if self.queued else None,
            "flushed": self.flushed,
        }
