"""How much a restore would lose, measured on the restored copy itself.

The recovered point is the newest commit the restored copy holds:
``pg_last_xact_replay_timestamp()`` (the commit time of the last transaction replayed, which
stays valid after promotion) and, when
the source runs ``drkit heartbeat``, the heartbeat row's time; the newer of the two counts. An
idle database with no heartbeat may have replayed no commit at all; then the backup's end is the
recovered point (everything committed before it is in the copy). The achieved RPO is the
disaster instant minus the recovered point.

The source's current WAL position, when it can be reached, gives the bytes of WAL written since
the recovered point: what would be lost if the disaster happened now. Each repository's
*exposure* is the same question asked of the archive: how old its newest backup and its newest
archived WAL are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from drkit.config.settings import Settings
from drkit.errors import DrkitError
from drkit.pg.cluster import Cluster
from drkit.pg.wal import parse_lsn
from drkit.repo.drills import Exposure, RpoDetail
from drkit.repo.open import open_repository

SOURCE_CONNECT_TIMEOUT = 5  # seconds: an unreachable source is a fact to report, not a wait


@dataclass(frozen=True)
class Recovered:
    detail: RpoDetail
    heartbeat_at: datetime | None  # the heartbeat row's time, when the copy has one


def measure_recovered(
    cluster: Cluster,
    settings: Settings,
    disaster_time: datetime,
    backup_stop_time: datetime,
) -> Recovered:
    """The recovered point of the running restored ``cluster`` and, when the source answers, the
    WAL bytes between it and the source's current position."""
    with cluster.connect() as conn:
        row = conn.execute(
            "SELECT pg_last_xact_replay_timestamp(),"
            " coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text"
        ).fetchone()
    last_commit: datetime | None = row[0] if row else None
    recovered_lsn: str | None = row[1] if row else None
    heartbeat_at = _heartbeat(cluster, settings)

    candidates = [
        ("heartbeat", heartbeat_at),
        ("last-commit", last_commit),
    ]
    known = [(method, at) for method, at in candidates if at is not None]
    if known:
        method, recovered_time = max(known, key=lambda item: item[1])
        if heartbeat_at is not None:
            method = "heartbeat"  # the heartbeat bounds an idle database's loss too
    else:
        method, recovered_time = "backup-end", backup_stop_time

    source_lsn = source_wal_position(settings)
    lost = None
    if source_lsn is not None and recovered_lsn is not None:
        lost = max(0, parse_lsn(source_lsn) - parse_lsn(recovered_lsn))
    detail = RpoDetail(
        method=method,
        disaster_time=disaster_time,
        recovered_time=recovered_time,
        recovered_lsn=recovered_lsn,
        source_lsn=source_lsn,
        lost_bytes=lost,
    )
    return Recovered(detail, heartbeat_at)


def _heartbeat(cluster: Cluster, settings: Settings) -> datetime | None:
    """The heartbeat row's time in the restored copy; None when it has no heartbeat table."""
    beat = settings.heartbeat
    query = sql.SQL("SELECT max(at) FROM public.{}").format(sql.Identifier(beat.table))
    try:
        with cluster.connect(beat.database) as conn:
            row = conn.execute(query).fetchone()
    except psycopg.Error:
        return None  # no such database or table: the source never ran drkit heartbeat
    return row[0] if row else None


def source_wal_position(settings: Settings) -> str | None:
    """The source's current WAL position (its replay position on a standby), or None when it
    cannot be reached: a drill assumes the source may be gone."""
    try:
        with psycopg.connect(
            settings.postgres.conninfo(), connect_timeout=SOURCE_CONNECT_TIMEOUT, autocommit=True
        ) as conn:
            row = conn.execute(
                "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
                " ELSE pg_current_wal_lsn() END::text"
            ).fetchone()
    except psycopg.Error:
        return None
    return str(row[0]) if row and row[0] else None


def exposure(settings: Settings, now: datetime) -> list[Exposure]:
    """Per configured repository: its newest backup and newest archived WAL, and their ages.
    A repository that cannot be read is listed with nothing known."""
    from drkit.repo.wal_archive import WalArchive

    found = []
    for repo_settings in settings.repo:
        entry = Exposure(repo=repo_settings.name)
        try:
            repo = open_repository(settings, repo_settings.name)
            labels = repo.backups()
            if labels:
                newest = labels[-1]
                entry = entry.model_copy(
                    update={
                        "newest_backup": str(newest),
                        "newest_backup_age_seconds": (now - newest.time).total_seconds(),
                    }
                )
            archive = WalArchive(repo)
            timelines = archive.timelines()
            last = archive.last_segment(timelines[-1]) if timelines else None
            if last is not None:
                age = (now - archive.pushed_at(last)).total_seconds()
                entry = entry.model_copy(update={"newest_wal": last, "newest_wal_age_seconds": age})
        except DrkitError as exc:
            entry = entry.model_copy(update={"error": exc.message})
        found.append(entry)
    return found
