"""PostgreSQL's WAL archiver as drkit sees it: ``pg_stat_archiver`` and what makes it failing.

A backup restores on its own, but point-in-time recovery needs every segment since; an
archive_command that fails is noticed by nobody until a restore needs the missing WAL. So
``init``, ``backup`` and ``check`` read these counters and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ArchiverStats:
    """One reading of ``pg_stat_archiver`` (counters since the last statistics reset)."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None

    @property
    def failing(self) -> bool:
        """The newest attempt failed: the last failure is newer than the last success."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time

    def as_dict(self) -> dict[str, object]:
        return {
            "archived_count": self.archived_count,
            "last_archived_wal": self.last_archived_wal,
            "last_archived_time": _iso(self.last_archived_time),
            "failed_count": self.failed_count,
            "last_failed_wal": self.last_failed_wal,
            "last_failed_time": _iso(self.last_failed_time),
        }


def archiving_problem(now: ArchiverStats, before: ArchiverStats | None = None) -> str | None:
    """What is wrong with archiving, or None: the newest attempt failed, or (given an earlier
    reading) attempts failed since then."""
    failed = now.failed_count - before.failed_count if before is not None else None
    if now.failing:
        last = f"segment {now.last_failed_wal} at {_iso(now.last_failed_time)}"
        success = (
            f"the last success was {now.last_archived_wal} at {_iso(now.last_archived_time)}"
            if now.last_archived_time is not None
            else "no segment was ever archived"
        )
        return (
            f"WAL archiving is failing: archive_command failed {now.failed_count} time(s)"
            f" (last: {last}); {success}"
        )
    if failed:
        return (
            f"archive_command failed {failed} time(s) meanwhile (last: segment"
            f" {now.last_failed_wal} at {_iso(now.last_failed_time)}), then succeeded"
        )
    return None


ARCHIVING_HINT = (
    "PostgreSQL's log says why archive_command fails; 'drkit check' tests archiving end to end"
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None
