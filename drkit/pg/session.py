"""The PostgreSQL session a backup runs in: identity checks, WAL reservation, backup start/stop.

The session stays open for the whole backup: a non-exclusive backup is aborted by PostgreSQL when
its session ends, and the temporary replication slot that keeps the backup's WAL in pg_wal lives
exactly as long as the session. That slot is what lets a backup carry its own WAL without
depending on a WAL archive that may not exist.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg

from drkit.config.settings import PostgresSettings
from drkit.errors import PostgresError, UnsupportedPostgresVersion
from drkit.pg.archiver import ArchiverStats
from drkit.pg.basebackup import check_passfile, connection_error
from drkit.pg.summaries import (
    CONTENTS_SQL,
    SUMMARIES_SQL,
    ChangedBlocks,
    NoSummaries,
    changed_blocks,
    check_coverage,
)
from drkit.pg.wal import format_lsn, parse_lsn
from drkit.pg.watch import LOST_HINT, SessionLost, watched

log = logging.getLogger(__name__)

# The majors drkit reads and writes: each one's backup API, PGDATA layout and WAL records are
# tested (README). A later major may change any of them, so it is refused until tested too.
SUPPORTED_MAJORS = range(13, 19)


# The functions a backup in remote mode calls, whose EXECUTE a site may have revoked from PUBLIC
REMOTE_FUNCTIONS = (
    "pg_control_system()",
    "pg_control_init()",
    "pg_control_checkpoint()",
    "pg_create_physical_replication_slot(name, boolean, boolean)",
    "pg_current_snapshot()",
    "pg_snapshot_xmax(pg_snapshot)",
)


# What `drkit check` calls besides: a restore point and a WAL switch (superuser only by default)
CHECK_FUNCTIONS = ("pg_create_restore_point(text)", "pg_switch_wal()")


@dataclass(frozen=True)
class ClusterInfo:
    version_num: int  # e.g. 150004
    system_identifier: int
    data_directory: Path | None  # None: the role may not read it (remote mode needs not)
    data_checksums: bool
    wal_segment_size: int
    wal_level: str
    archive_mode: str
    archive_command: str
    max_replication_slots: int
    timeline: int
    catalog_version: int

    @property
    def major(self) -> int:
        return self.version_num // 10000


@dataclass(frozen=True)
class Tablespace:
    oid: int
    name: str
    location: Path


@dataclass(frozen=True)
class BackupStop:
    lsn: int
    next_xid: int  # transactions with this XID or later started after the backup ended
    backup_label: bytes
    tablespace_map: bytes

    @property
    def timeline(self) -> int:
        """The timeline the backup started on, from backup_label's START TIMELINE line."""
        for line in self.backup_label.decode().splitlines():
            if line.startswith("START TIMELINE:"):
                return int(line.split(":", 1)[1])
        raise PostgresError("backup_label returned by PostgreSQL has no START TIMELINE line")


class PgSession:
    """One psycopg connection (autocommit) to the cluster being backed up."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        if settings.passfile is not None:
            check_passfile(settings.passfile)  # libpq would silently pass over a shared one
        try:
            self._conn = psycopg.connect(
                settings.conninfo(), autocommit=True, application_name="drkit"
            )
        except psycopg.Error as exc:
            raise connection_error(_first_line(exc)) from None
        self._conn.execute("SET statement_timeout = 0")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PgSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        lost = self._conn.broken or self._conn.pgconn.status != psycopg.pq.ConnStatus.OK
        self.close()
        if (
            isinstance(exc, psycopg.Error | PostgresError)
            and lost
            and not isinstance(exc, SessionLost)
        ):
            # The server went away in the middle (stopped, restarted, the session terminated):
            # the backup in progress ended with it, on the server's side
            reason = _first_line(exc).removeprefix("query failed: ")
            raise SessionLost(
                f"the connection to PostgreSQL was lost: {reason}", hint=LOST_HINT
            ) from None

    def watched(self) -> AbstractContextManager[None]:
        """A stretch in which this session is not used: the server closing it raises
        SessionLost at once (drkit/pg/watch.py) instead of at the next query."""
        return watched(self._conn)

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...]:
        try:
            row = self._conn.execute(sql.encode(), params).fetchone()
        except psycopg.Error as exc:
            raise PostgresError(f"query failed: {_first_line(exc)}") from None
        assert row is not None
        return tuple(row)

    def version_num(self) -> int:
        return int(str(self._one("SHOW server_version_num")[0]))

    def cluster_info(self) -> ClusterInfo:
        version_num = self.version_num()
        check_supported(version_num)
        sysid, catversion, checksums, seg_size = self._one(
            "SELECT (SELECT system_identifier FROM pg_control_system()),"
            " (SELECT catalog_version_no FROM pg_control_system()),"
            " current_setting('data_checksums') = 'on',"
            " (SELECT bytes_per_wal_segment FROM pg_control_init())"
        )
        rows = self._conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('data_directory',"
            " 'wal_level', 'archive_mode', 'archive_command', 'max_replication_slots')"
        ).fetchall()
        settings: dict[str, str] = {str(name): str(value) for name, value in rows}
        if "data_directory" not in settings and self._settings.mode == "local":
            raise PostgresError(
                "the connecting role cannot read server settings",
                hint="connect as a superuser or a role with pg_read_all_settings",
            )
        timeline = int(str(self._one("SELECT timeline_id FROM pg_control_checkpoint()")[0]))
        return ClusterInfo(
            version_num=version_num,
            system_identifier=int(str(sysid)),
            data_directory=Path(settings["data_directory"])
            if "data_directory" in settings
            else None,
            data_checksums=bool(checksums),
            wal_segment_size=int(str(seg_size)),
            wal_level=settings["wal_level"],
            archive_mode=settings["archive_mode"],
            archive_command=settings.get("archive_command", ""),
            max_replication_slots=int(settings["max_replication_slots"]),
            timeline=timeline,
            catalog_version=int(str(catversion)),
        )

    def missing_remote_privileges(self, functions: tuple[str, ...] = ()) -> list[str]:
        """What the role lacks for a backup in remote mode (and to call ``functions``), one
        line each (empty: nothing)."""
        rolreplication, rolsuper = self._one(
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        if rolsuper:
            return []
        missing = []
        if not rolreplication:
            missing.append(
                "the REPLICATION attribute (ALTER ROLE ... REPLICATION): base backups and the"
                " temporary slot that keeps their WAL need it"
            )
        for function in self.missing_function_grants((*REMOTE_FUNCTIONS, *functions)):
            missing.append(f"EXECUTE on function {function} (GRANT EXECUTE ON FUNCTION ...)")
        return missing

    def missing_function_grants(self, functions: tuple[str, ...]) -> list[str]:
        """Those of ``functions`` the role may not call."""
        return [
            function
            for function in functions
            if not self._one("SELECT has_function_privilege(%s, 'EXECUTE')", (function,))[0]
        ]

    def current_wal_file(self) -> str:
        """The WAL segment the server is writing now (not complete, so not archived yet)."""
        return str(self._one("SELECT pg_walfile_name(pg_current_wal_lsn())")[0])

    def archiver_stats(self) -> ArchiverStats:
        """The archiver's counters (``pg_stat_archiver``)."""
        row = self._one(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count,"
            " last_failed_wal, last_failed_time FROM pg_stat_archiver"
        )
        archived, archived_wal, archived_at, failed, failed_wal, failed_at = row
        return ArchiverStats(
            archived_count=int(str(archived)),
            last_archived_wal=str(archived_wal) if archived_wal is not None else None,
            last_archived_time=cast(datetime | None, archived_at),
            failed_count=int(str(failed)),
            last_failed_wal=str(failed_wal) if failed_wal is not None else None,
            last_failed_time=cast(datetime | None, failed_at),
        )

    def switch_wal(self, marker: str) -> str:
        """Write a restore point named ``marker`` (so there is WAL to switch away from, as
        pgBackRest's check does), close the current segment and return its name: the segment
        archive_command is asked to archive next."""
        self._one("SELECT pg_create_restore_point(%s)", (marker,))
        return str(self._one("SELECT pg_walfile_name(pg_switch_wal())")[0])

    def in_recovery(self) -> bool:
        return bool(self._one("SELECT pg_is_in_recovery()")[0])

    def tablespaces(self) -> list[Tablespace]:
        rows = self._conn.execute(
            "SELECT oid, spcname, pg_tablespace_location(oid) FROM pg_tablespace"
            " WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid"
        ).fetchall()
        return [Tablespace(int(oid), str(name), Path(str(loc))) for oid, name, loc in rows]

    def reserve_wal(self) -> None:
        """Keep every WAL segment from now on in pg_wal until this session ends."""
        name = f"drkit_{os.getpid()}_{self._conn.info.backend_pid}"
        try:
            self._conn.execute(
                "SELECT pg_create_physical_replication_slot(%s, true, true)", (name,)
            )
        except psycopg.Error as exc:
            raise PostgresError(
                f"unable to create a temporary replication slot ({_first_line(exc)})",
                hint="drkit needs max_replication_slots > 0 and a free slot to keep the backup's"
                " WAL in pg_wal while it copies it",
            ) from None

    def start_backup(self, label: str, fast: bool, version_num: int) -> int:
        """Start a non-exclusive backup; returns its start LSN. Without ``fast`` the server
        spreads the checkpoint it starts with over up to checkpoint_timeout *
        checkpoint_completion_target seconds (minutes, by default) and says nothing meanwhile:
        the log says so, with the bound, first."""
        if not fast:
            spread = self._one(
                "SELECT extract(epoch FROM current_setting('checkpoint_timeout')::interval)"
                " * current_setting('checkpoint_completion_target')::float8"
            )[0]
            bound = round(float(str(spread)))
            log.info(
                f"waiting for a spread checkpoint (up to {bound} s; --start-fast to skip)",
                extra={"checkpoint_seconds": bound},
            )
        sql = (
            "SELECT pg_backup_start(%s, %s)"
            if version_num >= 150000
            else "SELECT pg_start_backup(%s, %s, false)"
        )
        return parse_lsn(str(self._one(sql, (label, fast))[0]))

    def changed_blocks(
        self, version_num: int, timeline: int, since: int, until: int, wait_s: float
    ) -> ChangedBlocks | None:
        """The main-fork blocks modified in [since, until) on ``timeline``, from the server's WAL
        summaries; waits up to ``wait_s`` for the summarizer to reach ``until`` (this backup's
        start). None when the server keeps none (before 17, or summarize_wal off); raises
        NoSummaries saying why those it keeps cannot be used."""
        if version_num < 170000 or self._one("SHOW summarize_wal")[0] != "on":
            return None
        deadline = time.monotonic() + wait_s
        state = "SELECT summarized_tli, summarized_lsn FROM pg_get_wal_summarizer_state()"
        while True:
            tli, lsn = self._one(state)
            if tli == timeline and parse_lsn(str(lsn)) >= until:
                break
            if time.monotonic() > deadline:
                raise NoSummaries(
                    f"the WAL summarizer did not reach the backup's start within {wait_s:g}s"
                    f" (it is at {lsn} on timeline {tli})"
                )
            time.sleep(0.02)
        args = {"tli": timeline, "since": format_lsn(since), "until": format_lsn(until)}
        try:
            summaries = self._conn.execute(SUMMARIES_SQL.encode(), args).fetchall()
            ranges = [(parse_lsn(str(start)), parse_lsn(str(end))) for start, end in summaries]
            check_coverage(ranges, since, until)
            # streamed row by row: only the compact ranges are kept (closing a stream that was
            # not read to its end cancels the query, so the session stays usable)
            stream = self._conn.cursor().stream(CONTENTS_SQL.encode(), args)
            with closing(cast("Generator[tuple[Any, ...]]", stream)) as rows:
                return changed_blocks(rows)
        except psycopg.Error as exc:
            raise PostgresError(f"reading the WAL summaries failed: {_first_line(exc)}") from None

    def summarize_wal(self) -> bool:
        """Whether the server keeps WAL summaries (17+, ``summarize_wal = on``)."""
        return self.version_num() >= 170000 and self._one("SHOW summarize_wal")[0] == "on"

    def server_time(self) -> datetime:
        """The server's clock, now (in UTC)."""
        value = self._one("SELECT clock_timestamp()")[0]
        assert isinstance(value, datetime)
        return value.astimezone(UTC)

    def next_xid(self) -> int:
        """The next transaction ID to be assigned (64-bit, with epoch)."""
        return int(str(self._one("SELECT pg_snapshot_xmax(pg_current_snapshot())")[0]))

    def stop_backup(self, version_num: int) -> BackupStop:
        # wait_for_archive=false: the backup carries its own WAL, it never waits on an archive.
        sql = (
            "SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)"
            if version_num >= 150000
            else "SELECT lsn, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        )
        lsn, label, spcmap = self._one(sql)
        return BackupStop(
            lsn=parse_lsn(str(lsn)),
            next_xid=self.next_xid(),
            backup_label=str(label).encode(),
            tablespace_map=str(spcmap or "").encode(),
        )


def check_supported(version_num: int) -> None:
    """Raise UnsupportedPostgresVersion for a server outside ``SUPPORTED_MAJORS``."""
    major = version_num // 10000
    if major in SUPPORTED_MAJORS:
        return
    first, last = SUPPORTED_MAJORS[0], SUPPORTED_MAJORS[-1]
    raise UnsupportedPostgresVersion(
        f"PostgreSQL {major} is not supported: drkit backs up PostgreSQL {first} to {last}",
        hint=f"upgrade the cluster to PostgreSQL {first} or later"
        if major < first
        else f"use a drkit release that names PostgreSQL {major} as tested; this one has not"
        " read its backup API, data directory or WAL",
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
