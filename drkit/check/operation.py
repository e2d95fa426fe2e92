"""drkit check: prove that WAL archiving works end to end, now (pgBackRest's ``check``).

A configuration that looks right proves little: archive_command may fail for want of a
permission, a repository may be unmounted, a key unreadable by the server's user. So the check
does what recovery will need: it makes PostgreSQL close a WAL segment (a restore point, then
``pg_switch_wal``), waits until that very segment is in every configured repository and reads it
back there (authenticated with the key), bounded by a timeout, and reports what
``pg_stat_archiver`` counted meanwhile. The primary repository not getting the segment is an
error; a secondary that has not caught up yet is a warning (WAL reaches it through the async
pusher or ``drkit replicate``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from drkit.config.settings import Settings
from drkit.errors import (
    ArchiveCheckFailed,
    ArchivingFailing,
    ObjectNotFound,
    WalNotCopied,
)
from drkit.pg.archiver import ARCHIVING_HINT, ArchiverStats, archiving_problem
from drkit.pg.remote_access import check_remote_access
from drkit.pg.session import CHECK_FUNCTIONS, ClusterInfo, PgSession
from drkit.repo.open import open_repository
from drkit.repo.repository import Repository
from drkit.repo.wal_archive import WalArchive
from drkit.repo.wal_names import parse_wal_name
from drkit.result import OperationResult

RESTORE_POINT = "drkit check"
POLL_SECONDS = 0.2
STATS_GRACE_SECONDS = 5.0  # for archive_command to return once its object is stored


@dataclass
class CheckRequest:
    timeout: float = 60.0  # seconds to wait for the segment in every repository


@dataclass
class RepositoryArrival:
    name: str
    seconds: float | None  # until the segment was there and read back; None: not in time


@dataclass(kw_only=True)
class CheckResult(OperationResult):
    """``phases``: cluster, repositories, switch, archive."""

    archive_command: str = ""
    segment: str | None = None  # the segment the check made PostgreSQL archive
    arrivals: list[RepositoryArrival] = field(default_factory=list)
    archiver: ArchiverStats | None = None

    def summary(self) -> str:
        """One line: where the segment arrived, and the archiver's counters."""
        where = ", ".join(
            f"'{a.name}' in {a.seconds:.1f}s" if a.seconds is not None else f"'{a.name}' not yet"
            for a in self.arrivals
        )
        text = f"WAL segment {self.segment} archived to {where}"
        if self.archiver is not None:
            text += (
                f"; archiver: {self.archiver.archived_count} archived,"
                f" {self.archiver.failed_count} failed"
            )
        return text

    def _data(self) -> dict[str, Any]:
        return {
            "archive_command": self.archive_command,
            "segment": self.segment,
            "repositories": {a.name: a.seconds for a in self.arrivals},
            "archiver": self.archiver.as_dict() if self.archiver is not None else None,
        }


def check_archiving(settings: Settings, request: CheckRequest) -> CheckResult:
    """Archive one fresh segment and wait for it in every repository. Raises
    ArchiveCheckFailed when archiving is off or the primary does not get the segment in time,
    RepositoryMissing (and the like) when a repository is not usable; a secondary that lags
    and failures the archiver counted meanwhile are warnings on the result."""
    result = CheckResult()
    repos = [open_repository(settings, repo.name) for repo in settings.repo]
    with PgSession(settings.postgres) as session:
        # Check the cluster archives at all, and every repository is there and is this cluster's
        with result.phase("cluster"):
            if settings.postgres.mode == "remote":
                check_remote_access(session, settings.postgres, CHECK_FUNCTIONS)
            cluster = _archiving_cluster(session)
            result.archive_command = cluster.archive_command
        with result.phase("repositories"):
            for repo in repos:
                repo.check(cluster.system_identifier, reading=True)

        # Close a segment, then wait for it in every repository
        before = session.archiver_stats()
        with result.phase("switch"):
            result.segment = session.switch_wal(RESTORE_POINT)
        with result.phase("archive"):
            result.arrivals = _wait_for_segment(repos, result.segment, request.timeout)
        result.archiver = _archiver_after(session, result.segment, result.arrivals[0])

    # Judge: the primary must have it; the rest are warnings
    _judge(result, before, request.timeout)
    return result


def _archiving_cluster(session: PgSession) -> ClusterInfo:
    cluster = session.cluster_info()
    if session.in_recovery():
        raise ArchiveCheckFailed(
            "the server is in recovery (a standby): it cannot switch WAL for the check",
            hint="run 'drkit check' against the primary",
        )
    if cluster.archive_mode == "off" or not cluster.archive_command:
        raise ArchiveCheckFailed(
            "WAL archiving is off: point-in-time recovery is impossible",
            hint="set archive_mode = on and archive_command = 'drkit wal-push --config"
            " /etc/drkit/drkit.toml %p' in postgresql.conf, and restart PostgreSQL",
        )
    return cluster


def _wait_for_segment(
    repos: list[Repository], segment: str, timeout: float
) -> list[RepositoryArrival]:
    """Polls every repository until the segment is there and reads back, or ``timeout``."""
    key = parse_wal_name(segment).key
    started = time.monotonic()
    arrived: dict[str, float] = {}
    while True:
        for repo in repos:
            if repo.name not in arrived and _arrived(repo, key, segment):
                arrived[repo.name] = time.monotonic() - started
        if len(arrived) == len(repos) or time.monotonic() - started >= timeout:
            break
        time.sleep(POLL_SECONDS)
    return [RepositoryArrival(repo.name, arrived.get(repo.name)) for repo in repos]


def _arrived(repo: Repository, key: str, segment: str) -> bool:
    """Whether the segment is in ``repo`` and authenticates (IntegrityError when damaged)."""
    if not repo.storage.exists(key):
        return False
    try:
        WalArchive(repo).check(segment)
    except ObjectNotFound:
        return False
    return True


def _archiver_after(session: PgSession, segment: str, primary: RepositoryArrival) -> ArchiverStats:
    """The counters once PostgreSQL has recorded the segment's success: the object is in the
    repository a moment before archive_command returns and the archiver counts it."""
    deadline = time.monotonic() + STATS_GRACE_SECONDS
    while True:
        stats = session.archiver_stats()
        counted = stats.last_archived_wal is not None and stats.last_archived_wal >= segment
        if primary.seconds is None or counted or time.monotonic() >= deadline:
            return stats
        time.sleep(POLL_SECONDS)


def _judge(result: CheckResult, before: ArchiverStats, timeout: float) -> None:
    assert result.archiver is not None and result.segment is not None
    problem = archiving_problem(result.archiver, before)
    primary, *secondaries = result.arrivals
    if primary.seconds is None:
        raise ArchiveCheckFailed(
            f"WAL segment {result.segment} did not reach repository '{primary.name}' within"
            f" {timeout:g}s" + (f": {problem}" if problem else ""),
            hint=ARCHIVING_HINT,
        )
    for lagging in (a for a in secondaries if a.seconds is None):
        result.warnings.append(
            WalNotCopied(
                f"WAL segment {result.segment} is not in repository '{lagging.name}' after"
                f" {timeout:g}s",
                hint="the async pusher ([archive] async = true) or 'drkit replicate' copies WAL"
                " to the other repositories",
            )
        )
    if problem:
        result.warnings.append(ArchivingFailing(problem, hint=ARCHIVING_HINT))
