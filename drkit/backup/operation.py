"""Take a full physical backup of a running cluster into the primary repository.

Order matters and is the repository's invariant: data objects, then the key record, then the
manifest. Until the manifest is written nothing is listed, so a backup killed at any point leaves
only unlisted leftovers, which the next backup removes under the same lock.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

from drkit import __version__
from drkit.backup.copy import CopyResult, FileCopier, Source
from drkit.config.settings import Settings
from drkit.errors import IntegrityError, PostgresError
from drkit.pg.pages import relation_segment
from drkit.pg.session import BackupStop, ClusterInfo, PgSession, Tablespace
from drkit.pg.walk import PgdataListing, walk_pgdata
from drkit.pg.wal import check_segment_header, format_lsn, parse_segment_name, segments_between
from drkit.progress import NoProgress, Progress
from drkit.repo.label import BackupLabel, BackupType
from drkit.repo.lock import operation_lock
from drkit.repo.manifest import (
    BackupStats,
    DirEntry,
    LinkEntry,
    Manifest,
    TablespaceEntry,
)
from drkit.repo.open import open_repository, repo_location
from drkit.repo.repository import Repository


@dataclass
class BackupResult:
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)
    removed_leftovers: list[str] = field(default_factory=list)


class BackupOperation:
    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or NoProgress()

    def run(self) -> BackupResult:
        started = time.monotonic()
        start_time = datetime.now(UTC)
        repo = open_repository(self.settings)
        with (
            PgSession(self.settings.postgres) as session,
            operation_lock(self.settings.lock_path, repo_location(self.settings.repo[0]), "backup"),
        ):
            # Check the cluster and the repository
            cluster = self._check_cluster(session)
            repo.check(cluster.system_identifier)
            removed = self._remove_leftovers(repo)
            label = self._new_label(repo)
            data_key = repo.keys.new_data_key()

            # Start the backup, keeping its WAL in pg_wal until we have copied it
            session.reserve_wal()
            start_lsn = session.start_backup(
                str(label), self.settings.backup.start_fast, cluster.version_num
            )
            tablespaces = session.tablespaces()
            copier = FileCopier(
                repo,
                label,
                data_key.plaintext,
                self.settings.backup,
                self.progress,
                page_check_lsn=start_lsn if cluster.data_checksums else None,
            )

            # Copy PGDATA and tablespaces
            listing = walk_pgdata(self.settings.postgres.pgdata, _tablespace_dir(cluster))
            sources = [_file_source(f.path, f.abspath, f.size, f.mode, f.mtime, cluster)
                       for f in listing.files]
            self.progress.start(f"backup {label}", sum(s.size for s in sources))
            data = copier.copy(sources)

            # Stop the backup and copy the WAL that makes it consistent
            stop = session.stop_backup(cluster.version_num)
            wal = copier.copy(self._wal_sources(cluster, start_lsn, stop))
            self.progress.stop()

            # Complete the backup: key record, then the manifest (which makes it visible)
            key_record = repo.write_key_record(label, data_key.record)
            manifest = self._manifest(
                label, cluster, start_lsn, stop, tablespaces, listing, data, wal, key_record,
                start_time, time.monotonic() - started,
            )
            repo.write_manifest(manifest, data_key.plaintext)
        return BackupResult(manifest, data.warnings + wal.warnings, [str(x) for x in removed])

    def _check_cluster(self, session: PgSession) -> ClusterInfo:
        cluster = session.cluster_info()
        if cluster.wal_level == "minimal":
            raise PostgresError(
                "wal_level is 'minimal', which cannot be backed up online",
                hint="set wal_level = replica in postgresql.conf and restart PostgreSQL",
            )
        if session.in_recovery():
            raise PostgresError(
                "the server is a standby; drkit backs up a primary",
                hint="point [postgres] at the primary",
            )
        configured = self.settings.postgres.pgdata
        if configured.resolve() != cluster.data_directory.resolve():
            raise PostgresError(
                f"postgres.pgdata is '{configured}' but the server's data_directory is"
                f" '{cluster.data_directory}'",
                hint="set [postgres] pgdata to the directory of the server drkit connects to",
            )
        return cluster

    def _remove_leftovers(self, repo: Repository) -> list[BackupLabel]:
        """Remove objects of backups that never completed (killed, failed); we hold the lock."""
        leftovers = repo.incomplete()
        for label in leftovers:
            repo.delete_objects(label)
        return leftovers

    def _new_label(self, repo: Repository) -> BackupLabel:
        while True:
            label = BackupLabel.new(BackupType.FULL, datetime.now(UTC))
            if not repo.label_in_use(label):
                return label
            time.sleep(1)  # labels have one-second resolution; never reuse one

    def _wal_sources(self, cluster: ClusterInfo, start_lsn: int, stop: BackupStop) -> list[Source]:
        pgdata = self.settings.postgres.pgdata
        now = time.time()
        sources = [
            Source("backup_label", len(stop.backup_label), 0o600, now,
                   partial(io.BytesIO, stop.backup_label), required=True)
        ]
        segment_size = cluster.wal_segment_size
        for name in segments_between(stop.timeline, start_lsn, stop.lsn, segment_size):
            path = pgdata / "pg_wal" / name
            opener = partial(_open_segment, path, name, segment_size, cluster.system_identifier)
            sources.append(Source(f"pg_wal/{name}", segment_size, 0o600, now, opener, required=True))
        for history in sorted((pgdata / "pg_wal").glob("*.history")):
            sources.append(
                Source(f"pg_wal/{history.name}", history.stat().st_size, 0o600, now,
                       partial(open, history, "rb"), required=True)  # type: ignore[arg-type]
            )
        return sources

    def _manifest(
        self,
        label: BackupLabel,
        cluster: ClusterInfo,
        start_lsn: int,
        stop: BackupStop,
        tablespaces: list[Tablespace],
        listing: PgdataListing,
        data: CopyResult,
        wal: CopyResult,
        key_record: str,
        start_time: datetime,
        duration: float,
    ) -> Manifest:
        files = sorted(data.files + wal.files, key=lambda f: f.path)
        objects = sorted(data.objects + wal.objects, key=lambda o: o.key)
        segment_size = cluster.wal_segment_size
        wal_names = segments_between(stop.timeline, start_lsn, stop.lsn, segment_size)
        pg_stat = os.stat(self.settings.postgres.pgdata)
        return Manifest(
            label=str(label),
            type=BackupType.FULL.value,
            drkit_version=__version__,
            start_time=start_time,
            stop_time=datetime.now(UTC),
            start_lsn=format_lsn(start_lsn),
            stop_lsn=format_lsn(stop.lsn),
            timeline=stop.timeline,
            start_wal=wal_names[0],
            stop_wal=wal_names[-1],
            pg_version_num=cluster.version_num,
            system_identifier=str(cluster.system_identifier),
            wal_segment_size=segment_size,
            data_checksums=cluster.data_checksums,
            key_record=key_record,
            owner=_user_name(pg_stat.st_uid),
            group=_group_name(pg_stat.st_gid),
            tablespaces=[
                TablespaceEntry(oid=t.oid, name=t.name, location=str(t.location))
                for t in tablespaces
            ],
            directories=[DirEntry(path=d.path, mode=d.mode) for d in listing.dirs],
            links=[LinkEntry(path=link.path, target=link.target) for link in listing.links],
            files=files,
            objects=objects,
            stats=BackupStats(
                files=len(files),
                size=sum(f.size for f in files),
                stored=sum(o.size for o in objects),
                duration_s=round(duration, 3),
            ),
        )


def _tablespace_dir(cluster: ClusterInfo) -> str:
    return f"PG_{cluster.major}_{cluster.catalog_version}"


def _file_source(path: str, abspath: Path, size: int, mode: int, mtime: float,
                 cluster: ClusterInfo) -> Source:
    segment = relation_segment(path) if cluster.data_checksums else None
    return Source(path, size, mode, mtime, partial(open, abspath, "rb", buffering=0),  # type: ignore[arg-type]
                  page_check_segment=segment)


def _open_segment(path: Path, name: str, segment_size: int, system_identifier: int) -> BinaryIO:
    """Open a WAL segment in pg_wal, refusing one that is not the segment its name says."""
    _, segno = parse_segment_name(name, segment_size)
    try:
        stream = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
    except FileNotFoundError:
        raise IntegrityError(
            f"WAL segment '{name}' needed by the backup is missing from pg_wal",
            hint="it should be held by drkit's temporary replication slot; check the server log",
        ) from None
    problem = check_segment_header(stream.read(64), segno, segment_size, system_identifier)
    if problem:
        stream.close()
        raise IntegrityError(f"WAL segment '{name}' in pg_wal {problem}")
    stream.seek(0)
    return stream


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
