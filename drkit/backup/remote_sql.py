"""Remote diff/incr without WAL summaries (PostgreSQL 15 and 16, or 17+ with summarize_wal
off): the data directory read over SQL (pg/remote_files.py).

The backup is the local engine's (backup/operation.py), started and stopped on the session drkit
holds, with the listing, the file reads and pg_wal's segments taken from the server's functions:
the changed blocks come from the WAL (the repository's archive first, then the server's pg_wal),
only those blocks are read (``pg_read_binary_file`` at their offsets), and they are stored as
the local engine's page deltas. What makes the backup consistent is stored as in local mode:
backup_label from ``pg_backup_stop`` and the WAL from its start to its stop, read from pg_wal
(kept there by the temporary replication slot).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import partial

from drkit.backup.datadir import tablespace_version_dir
from drkit.backup.plan import Source, SourceOpener, SourceStream
from drkit.config.settings import PostgresSettings
from drkit.errors import IntegrityError
from drkit.pg.remote_files import RemoteFile, RemoteFiles
from drkit.pg.session import BackupStop, ClusterInfo
from drkit.pg.wal import check_segment_header, parse_segment_name, segments_between
from drkit.pg.walblocks import SegmentSource
from drkit.pg.walk import PgdataListing, SourceFile

WAL_HEADER_BYTES = 64  # a WAL segment's long page header


class RemoteDataDir:
    """The server's data directory, read over SQL; ``close`` ends its connections."""

    archive_first = True  # the archive is at hand; pg_wal's segments cross the network

    def __init__(
        self, settings: PostgresSettings, cluster: ClusterInfo, owner: tuple[str, str]
    ) -> None:
        self.files = RemoteFiles(settings)
        self._cluster = cluster
        self._owner = owner  # the server's file owner is not visible over SQL: the parent's
        self.open_source: SourceOpener = self._opener

    def __enter__(self) -> RemoteDataDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.files.close()

    def _opener(self, f: SourceFile) -> Callable[[], SourceStream]:
        return partial(self.files.open, f.path)

    def listing(self, cluster: ClusterInfo) -> PgdataListing:
        return self.files.listing(tablespace_version_dir(cluster))

    def pg_wal(self) -> SegmentSource:
        return self._segment

    def _segment(self, name: str) -> bytes | None:
        """A WAL segment from the server's pg_wal; None when it is not there, or is a recycled
        file whose header names another segment (pg/walblocks.py then looks elsewhere)."""
        size, sysid = self._cluster.wal_segment_size, self._cluster.system_identifier
        data = self.files.read(f"pg_wal/{name}", 0, size)
        if data is None or len(data) != size:
            return None
        _, segno = parse_segment_name(name, size)
        problem = check_segment_header(data[:WAL_HEADER_BYTES], segno, size, sysid)
        return None if problem else data

    def wal_sources(self, cluster: ClusterInfo, start_lsn: int, stop: BackupStop) -> list[Source]:
        now = time.time()
        label = stop.backup_label
        sources = [
            Source(
                "backup_label", len(label), 0o600, now, partial(io.BytesIO, label), required=True
            )
        ]
        segment_size = cluster.wal_segment_size
        for name in segments_between(stop.timeline, start_lsn, stop.lsn, segment_size):
            opener = partial(self._open_segment, name, cluster)
            sources.append(
                Source(f"pg_wal/{name}", segment_size, 0o600, now, opener, required=True)
            )
        for name in self.files.names("pg_wal"):
            if name.endswith(".history"):
                opener = partial(self.files.open, f"pg_wal/{name}")
                size = self.files.size(f"pg_wal/{name}") or 0
                sources.append(Source(f"pg_wal/{name}", size, 0o600, now, opener, required=True))
        return sources

    def _open_segment(self, name: str, cluster: ClusterInfo) -> RemoteFile:
        """A WAL segment the backup needs, refused when it is not the segment its name says."""
        try:
            stream = self.files.open(f"pg_wal/{name}")
        except FileNotFoundError:
            raise IntegrityError(
                f"WAL segment '{name}' needed by the backup is missing from the server's pg_wal",
                hint="it should be held by drkit's temporary replication slot; check the server"
                " log",
            ) from None
        _, segno = parse_segment_name(name, cluster.wal_segment_size)
        head = self.files.read(stream.path, 0, WAL_HEADER_BYTES) or b""
        problem = check_segment_header(
            head, segno, cluster.wal_segment_size, cluster.system_identifier
        )
        if problem:
            raise IntegrityError(f"WAL segment '{name}' in the server's pg_wal {problem}")
        return stream

    def owner(self) -> tuple[str, str]:
        return self._owner
