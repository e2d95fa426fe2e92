"""Where a file-by-file backup reads the data directory: the local file system, or the server's
own files over SQL (remote diff/incr before PostgreSQL 17, backup/remote_sql.py). Both feed the
same plan and pipeline: the listing, how a listed file opens, the WAL in pg_wal, and what makes
the backup consistent (backup_label and its WAL).
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import Protocol

from drkit.backup.plan import Source, SourceOpener, pg_wal_segments, wal_sources
from drkit.pg.session import BackupStop, ClusterInfo
from drkit.pg.walblocks import SegmentSource
from drkit.pg.walk import PgdataListing, walk_pgdata


class DataDir(Protocol):
    """A running cluster's data directory as a backup reads it."""

    @property
    def open_source(self) -> SourceOpener | None:
        """How a listed file opens (None: from the local file system, plan_sources's way)."""
        ...

    @property
    def archive_first(self) -> bool:
        """Whether the changed blocks' WAL is read from the repository's archive first."""
        ...

    def listing(self, cluster: ClusterInfo) -> PgdataListing: ...

    def pg_wal(self) -> SegmentSource: ...

    def wal_sources(self, cluster: ClusterInfo, start_lsn: int, stop: BackupStop) -> list[Source]:
        """backup_label, the WAL from the backup's start to its stop and the history files."""
        ...

    def owner(self) -> tuple[str, str]:
        """The data directory's owner and group, by name."""
        ...


class LocalDataDir:
    """PGDATA on this host."""

    open_source: SourceOpener | None = None
    archive_first = False

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata

    def listing(self, cluster: ClusterInfo) -> PgdataListing:
        return walk_pgdata(self.pgdata, tablespace_version_dir(cluster))

    def pg_wal(self) -> SegmentSource:
        return pg_wal_segments(self.pgdata / "pg_wal")

    def wal_sources(self, cluster: ClusterInfo, start_lsn: int, stop: BackupStop) -> list[Source]:
        return wal_sources(self.pgdata, cluster, start_lsn, stop)

    def owner(self) -> tuple[str, str]:
        st = os.stat(self.pgdata)
        return _user_name(st.st_uid), _group_name(st.st_gid)


def tablespace_version_dir(cluster: ClusterInfo) -> str:
    """The directory of a tablespace that belongs to this cluster's major version."""
    return f"PG_{cluster.major}_{cluster.catalog_version}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
