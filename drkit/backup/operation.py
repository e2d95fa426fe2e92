"""Take a full physical backup of a running cluster into the primary repository.

Order matters and is the repository's invariant: data objects, then the key record, then the
manifest. Until the manifest is written nothing is listed, so a backup killed at any point leaves
only unlisted leftovers, which the next backup removes under the same lock and lease
(drkit/repo/lease.py: a second host never removes a backup in progress). The other
repositories get the same order: each data object is streamed to them as soon as it is committed
here (drkit/repo/fanout.py), the key record and manifest only once the backup is complete.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drkit import __version__
from drkit.backup.base import BaseVersions
from drkit.backup.copy import CopyResult, FileCopier
from drkit.backup.datadir import DataDir, LocalDataDir
from drkit.backup.plan import changed_blocks, plan_sources
from drkit.backup.remote import RemoteBackup, RemoteIncremental, remote_incremental, take_remote
from drkit.backup.remote_sql import RemoteDataDir
from drkit.config.settings import Settings
from drkit.errors import ArchivingFailing, BackupNotCopied, IntegrityError, PostgresError
from drkit.pg.archiver import ARCHIVING_HINT, ArchiverStats, archiving_problem
from drkit.pg.basebackup import IncrementalRefused
from drkit.pg.remote_access import check_remote_access
from drkit.pg.remote_files import file_functions
from drkit.pg.session import BackupStop, ClusterInfo, PgSession, Tablespace
from drkit.pg.wal import format_lsn, segments_between
from drkit.pg.walk import PgdataListing
from drkit.progress import NoProgress, Progress
from drkit.repo.copies import ReplicationReport
from drkit.repo.fanout import FanOut
from drkit.repo.identity import check_identity
from drkit.repo.label import BackupLabel, BackupType, label_after
from drkit.repo.lease import RepositoryLease, repository_lease
from drkit.repo.manifest import BackupStats, DirEntry, LinkEntry, Manifest, TablespaceEntry
from drkit.repo.open import open_repository, repo_location
from drkit.repo.repository import Repository
from drkit.result import OperationResult, Stopwatch
from drkit.storage.posix import PosixStorage

log = logging.getLogger(__name__)

# Temporary files in a posix repository older than this belong to killed writers; younger ones
# may be another process's write in progress (a wal-push, a copy), so they stay.
STALE_TEMPORARY_SECONDS = 3600


@dataclass
class BackupResult(OperationResult):
    """A committed backup. Warnings: PageChecksumFailure, BackupNotCopied, ArchivingFailing.
    ``phases``: check
    (cluster, repository, leftovers, parent), start (pg_backup_start), plan (list PGDATA, find
    the changed blocks), copy (PGDATA and tablespaces), stop (pg_backup_stop), wal (the WAL the
    backup needs), complete (key record and manifest), fanout (the other repositories)."""

    manifest: Manifest
    removed_leftovers: list[str] = field(default_factory=list)
    notice: str | None = None  # e.g. why a diff/incr became a full backup
    copies: ReplicationReport | None = None

    def _data(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "label": m.label,
            "type": m.type,
            "parent": m.parent,
            "stats": m.stats.model_dump(),
            "notice": self.notice,
            "start_lsn": m.start_lsn,
            "stop_lsn": m.stop_lsn,
            "removed_leftovers": self.removed_leftovers,
            "copies": [r.__dict__ for r in self.copies.repos] if self.copies else [],
        }


def take_backup(
    settings: Settings, kind: BackupType = BackupType.FULL, progress: Progress | None = None
) -> BackupResult:
    """Take a backup of ``kind`` into the primary repository and copy it to the others."""
    return BackupOperation(settings, kind, progress).run()


class BackupOperation:
    def __init__(
        self,
        settings: Settings,
        kind: BackupType = BackupType.FULL,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.progress = progress or NoProgress()

    def run(self) -> BackupResult:
        phases: dict[str, float] = {}
        clock = Stopwatch(phases)
        repo = open_repository(self.settings)
        with FanOut(self.settings, repo) as fanout:  # the other repositories, while we run
            with PgSession(self.settings.postgres) as session:
                # Check the cluster first: an unsupported or misconfigured server ends here
                cluster = self._check_cluster(session)
                with repository_lease(
                    self.settings, repo, repo_location(self.settings.repo[0]), "backup", "backup"
                ) as lease:
                    # Check the repository, find the parent of a diff/incr
                    archiver_before = session.archiver_stats()
                    repo.check(cluster.system_identifier)
                    check_identity(repo.storage, repo.keys)
                    removed = self._remove_leftovers(repo, lease)
                    parent, notice, how = self._choose_parent(repo, cluster, session)
                    if notice:
                        log.info(notice)
                    taken = _Taken(self._new_label(repo, parent, removed), parent, cluster, how)
                    data_key = repo.keys.new_data_key()
                    clock.lap("check")

                    # Stream each data object to the other repositories once it is committed here
                    fanout.start(cluster.system_identifier)

                    # Take the data: a base backup over the network, or file by file
                    session.reserve_wal()  # the backup's WAL stays in pg_wal until it is stored
                    if self._base_backup(taken):
                        refused = self._take_remote(
                            session, repo, taken, data_key.plaintext, fanout
                        )
                        notice = refused or notice
                        clock.lap("copy")
                    if not self._base_backup(taken):  # or the server refused an incremental
                        with self._data_dir(session, taken) as datadir:
                            found = self._take_files(
                                session, repo, taken, data_key.plaintext, fanout, clock, datadir
                            )
                        notice = notice or found
                    archiving = _archiving_warning(
                        cluster, archiver_before, session.archiver_stats()
                    )

                    # Complete the backup: key record, then the manifest (which makes it visible),
                    # only while the lease is ours: a host that took it over may delete our objects
                    lease.check()
                    key_record = repo.write_key_record(
                        taken.label, data_key.record, data_key.plaintext
                    )
                    manifest = self._manifest(taken, key_record)
                    repo.write_manifest(manifest, data_key.plaintext)
                    clock.lap("complete")

            # Fan out the rest: data objects not streamed yet, key records, the manifest last
            copies = fanout.finish(taken.label)
        clock.lap("fanout")
        warnings = taken.copied.warnings + ([archiving] if archiving else [])
        if lease.taken_over is not None:
            warnings.append(lease.taken_over)
        for failed in copies.repos:
            if failed.error is not None:
                warnings.append(
                    BackupNotCopied(
                        f"backup {taken.label} is not yet copied to repository '{failed.repo}':"
                        f" {failed.error} (run 'drkit replicate' when it is back)"
                    )
                )
        return BackupResult(
            manifest=manifest,
            removed_leftovers=[str(x) for x in removed],
            notice=notice,
            copies=copies,
            warnings=warnings,
            phases=phases,
        )

    def _base_backup(self, taken: _Taken) -> bool:
        """Whether to take a base backup over a replication connection (a remote full, or a
        remote diff/incr that uses the server's WAL summaries) rather than read the data
        directory file by file."""
        if self.settings.postgres.mode != "remote":
            return False
        return taken.parent is None or taken.remote is RemoteIncremental.BASE_BACKUP

    def _data_dir(self, session: PgSession, taken: _Taken) -> AbstractContextManager[DataDir]:
        if self.settings.postgres.mode != "remote":
            return nullcontext(LocalDataDir(self.settings.postgres.local_pgdata()))
        assert taken.parent is not None  # a remote full is a base backup
        # file times are in the server's clock: see _take_remote
        taken.start_time = min(taken.start_time, session.server_time())
        owner = (taken.parent.owner, taken.parent.group)
        return RemoteDataDir(self.settings.postgres, taken.cluster, owner)

    def _take_files(
        self,
        session: PgSession,
        repo: Repository,
        taken: _Taken,
        dek: bytes,
        fanout: FanOut,
        clock: Stopwatch,
        datadir: DataDir,
    ) -> str | None:
        """Copy PGDATA, its tablespaces and the WAL that makes them consistent, file by file;
        a notice when a diff/incr could not learn its changed blocks from the WAL."""
        cluster, parent = taken.cluster, taken.parent
        # Start the backup, keeping its WAL in pg_wal until we have copied it
        taken.start_lsn = session.start_backup(
            str(taken.label), self.settings.backup.start_fast, cluster.version_num
        )
        clock.lap("start")
        taken.tablespaces = session.tablespaces()
        taken.listing = datadir.listing(cluster)
        found = changed_blocks(
            session,
            cluster,
            repo,
            parent,
            taken.start_lsn,
            taken.listing,
            self.settings.backup,
            datadir.pg_wal(),
            datadir.archive_first,
        )
        changed, taken.changes = found.changed, found.source
        if found.notice:
            log.info(found.notice)
        taken.owner, taken.group = datadir.owner()
        copier = FileCopier(
            repo,
            taken.label,
            dek,
            self.settings.backup,
            self.progress,
            page_check_lsn=taken.start_lsn if cluster.data_checksums else None,
            fanout=fanout,
            base_versions=self._base_versions(repo, parent),
        )

        # Copy PGDATA and tablespaces: whole files, changed pages, or references
        sources, unchanged = plan_sources(
            taken.listing,
            cluster,
            parent,
            changed,
            self.settings.backup,
            datadir.open_source,
        )
        clock.lap("plan")
        self.progress.start(f"backup {taken.label}", sum(s.size for s in sources))
        with session.watched():  # PostgreSQL stopping ends the backup: stop copying at once
            taken.add(copier.copy(sources))
        taken.copied.files += unchanged
        self.progress.stop()
        clock.lap("copy")

        # Stop the backup and copy the WAL that makes it consistent (its own total: it is
        # known only now)
        taken.stop = session.stop_backup(cluster.version_num)
        clock.lap("stop")
        wal = datadir.wal_sources(cluster, taken.start_lsn, taken.stop)
        self.progress.start(f"WAL of backup {taken.label}", sum(s.size for s in wal))
        taken.add(copier.copy(wal))
        self.progress.stop()
        clock.lap("wal")
        return found.notice

    def _take_remote(
        self, session: PgSession, repo: Repository, taken: _Taken, dek: bytes, fanout: FanOut
    ) -> str | None:
        """Store what a base backup over a replication connection sends (backup/remote.py): a
        diff/incr is the server's incremental backup on top of the parent. A notice when the
        server refused one: then either nothing is taken and ``taken.remote`` says to read the
        data directory over SQL instead, or a full backup was taken."""
        cluster, notice = taken.cluster, None
        # The files' mtimes are in the server's clock: a later diff/incr trusts them only if
        # older than this start, so it must not be later in that clock than in ours
        taken.start_time = min(taken.start_time, session.server_time())

        def make_copier(start_lsn: int) -> FileCopier:
            check_lsn = start_lsn if cluster.data_checksums else None
            return FileCopier(
                repo, taken.label, dek, self.settings.backup, self.progress, check_lsn, fanout
            )

        def take() -> RemoteBackup:
            label = str(taken.label)
            return take_remote(
                self.settings, session, cluster, label, make_copier, self.progress, taken.parent
            )

        try:
            remote = take()
        except IncrementalRefused as exc:  # before anything was stored
            how = remote_incremental(session, cluster, self.settings.backup, exc)
            if not isinstance(how, str):
                taken.remote = how
                notice = (
                    f"the server refused an incremental backup ({exc}): reading the changed"
                    " blocks over SQL instead"
                )
                log.info(notice)
                return notice
            notice = f"{how}: taking a full backup instead of {self.kind}"
            log.info(notice)
            taken.label, taken.parent = self._new_label(repo, None, [taken.label]), None
            remote = take()
        taken.changes = "summaries" if taken.parent is not None else None
        taken.start_lsn, taken.stop, taken.listing = remote.start_lsn, remote.stop, remote.listing
        taken.tablespaces, taken.owner, taken.group = remote.tablespaces, remote.owner, remote.group
        taken.add(remote.copied)
        return notice

    def _base_versions(self, repo: Repository, parent: Manifest | None) -> BaseVersions | None:
        """The parent's pages, for deltas stored as XOR differences (backup.xor_deltas)."""
        if parent is None or not self.settings.backup.xor_deltas:
            return None
        return BaseVersions(repo, parent.label)

    def _check_cluster(self, session: PgSession) -> ClusterInfo:
        if self.settings.postgres.mode == "remote":
            incremental = self.kind is not BackupType.FULL
            functions = file_functions(session.version_num(), incremental)
            check_remote_access(session, self.settings.postgres, functions)
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
        if self.settings.postgres.mode == "remote":
            return cluster
        configured = self.settings.postgres.local_pgdata()
        assert cluster.data_directory is not None  # PgSession requires it in local mode
        if configured.resolve() != cluster.data_directory.resolve():
            raise PostgresError(
                f"postgres.pgdata is '{configured}' but the server's data_directory is"
                f" '{cluster.data_directory}'",
                hint="set [postgres] pgdata to the directory of the server drkit connects to",
            )
        return cluster

    def _remove_leftovers(self, repo: Repository, lease: RepositoryLease) -> list[BackupLabel]:
        """Remove objects of backups that never completed (killed, failed) and temporary files
        of killed writers; we hold the lock and the lease (whose holder before us may, on
        another host, still be writing: see `RepositoryLease.may_remove`)."""
        if isinstance(repo.storage, PosixStorage):
            # Only old ones: a wal-push or another repository's copy may be writing right now.
            removed = repo.storage.cleanup_temp(STALE_TEMPORARY_SECONDS)
            if removed:
                log.info(f"removed {removed} stale temporary file(s) of killed writers")
        leftovers = [label for label in repo.incomplete() if lease.may_remove(label)]
        for label in leftovers:
            repo.delete_objects(label)
        return leftovers

    def _choose_parent(
        self, repo: Repository, cluster: ClusterInfo, session: PgSession
    ) -> tuple[Manifest | None, str | None, RemoteIncremental | None]:
        """The parent of a diff (last full) or incr (last backup); None (with the reason) when
        there is no usable one and the backup falls back to full. In remote mode, also how the
        diff/incr reads its changes."""
        if self.kind is BackupType.FULL:
            return None, None, None
        labels = repo.backups()
        if self.kind is BackupType.DIFF:
            labels = [label for label in labels if label.type is BackupType.FULL]
        if not labels:
            return (
                None,
                f"no earlier backup to base a {self.kind} backup on: taking a full backup",
                None,
            )
        # A manifest that fails authentication (damaged, or added by someone who cannot seal
        # one) is passed over: the newest authentic backup is the parent.
        skipped: list[str] = []
        for candidate in reversed(labels):
            try:
                parent, _ = repo.load_manifest(candidate)
                break
            except IntegrityError as exc:
                skipped.append(f"backup '{candidate}' skipped as a parent: {exc}")
        else:
            return None, f"{skipped[0]}: taking a full backup instead of {self.kind}", None
        labels = labels[: labels.index(candidate) + 1]
        reason, how = None, None
        if parent.pg_major != cluster.major:
            reason = f"PostgreSQL was upgraded from {parent.pg_major} to {cluster.major}"
        elif parent.system_identifier != str(cluster.system_identifier):
            reason = "the parent belongs to another database system"
        elif parent.timeline != cluster.timeline:
            reason = (
                f"the cluster is on timeline {cluster.timeline}, its last backup on timeline"
                f" {parent.timeline} (a point-in-time recovery happened since)"
            )
        elif parent.data_checksums != cluster.data_checksums:
            turned = "on" if cluster.data_checksums else "off"
            reason = f"data checksums were turned {turned} since the parent (pg_checksums)"
        elif not repo.verified_ok(labels[-1]):
            reason = f"backup '{parent.label}' failed its last verification"
        elif missing := [m for m in parent.chain if m not in {str(label) for label in labels}]:
            reason = f"backup '{missing[0]}', which backup '{parent.label}' depends on, is missing"
        elif self.settings.postgres.mode == "remote":
            found = remote_incremental(session, cluster, self.settings.backup)
            reason, how = (found, None) if isinstance(found, str) else (None, found)
        if reason:
            return None, f"{reason}: taking a full backup instead of {self.kind}", None
        return parent, "; ".join(skipped) or None, how

    def _new_label(
        self, repo: Repository, parent: Manifest | None, removed: list[BackupLabel]
    ) -> BackupLabel:
        """A label no backup has used (not even a leftover just removed here, whose streamed
        objects another repository may still hold until the fan-out removes them) that sorts
        after the newest backup's when waiting for the next second can make it (label_after)."""
        kind = self.kind if parent is not None else BackupType.FULL
        full = BackupLabel(parent.label) if parent is not None else None
        newest = max(repo.backups(), default=None)
        while True:
            label = label_after(kind, datetime.now(UTC), full, newest)
            if label is not None and label not in removed and not repo.label_in_use(label):
                return label
            time.sleep(1)  # labels have one-second resolution; never reuse one

    def _manifest(self, taken: _Taken, key_record: str) -> Manifest:
        assert taken.stop is not None and taken.listing is not None
        cluster, stop, parent = taken.cluster, taken.stop, taken.parent
        files = sorted(taken.copied.files, key=lambda f: f.path)
        objects = sorted(taken.copied.objects, key=lambda o: o.key)
        segment_size = cluster.wal_segment_size
        wal_names = segments_between(stop.timeline, taken.start_lsn, stop.lsn, segment_size)
        return Manifest(
            label=str(taken.label),
            type=taken.label.type.value,
            parent=parent.label if parent else None,
            chain=[*(parent.chain if parent else []), str(taken.label)],
            drkit_version=__version__,
            start_time=taken.start_time,
            stop_time=datetime.now(UTC),
            start_lsn=format_lsn(taken.start_lsn),
            stop_lsn=format_lsn(stop.lsn),
            stop_next_xid=stop.next_xid,
            timeline=stop.timeline,
            start_wal=wal_names[0],
            stop_wal=wal_names[-1],
            pg_version_num=cluster.version_num,
            system_identifier=str(cluster.system_identifier),
            wal_segment_size=segment_size,
            data_checksums=cluster.data_checksums,
            key_record=key_record,
            owner=taken.owner,
            group=taken.group,
            tablespaces=[
                TablespaceEntry(oid=t.oid, name=t.name, location=str(t.location))
                for t in taken.tablespaces
            ],
            directories=[DirEntry(path=d.path, mode=d.mode) for d in taken.listing.dirs],
            links=[LinkEntry(path=link.path, target=link.target) for link in taken.listing.links],
            files=files,
            objects=objects,
            stats=BackupStats(
                files=len(files),
                size=sum(f.size for f in files),
                stored=sum(o.size for o in objects),
                duration_s=round(time.monotonic() - taken.started, 3),
                changes=taken.changes,
            ),
        )


@dataclass
class _Taken:
    """What a backup in progress has gathered so far, for its manifest."""

    label: BackupLabel
    parent: Manifest | None
    cluster: ClusterInfo
    remote: RemoteIncremental | None = None  # how a remote diff/incr reads its changes
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.monotonic)
    start_lsn: int = 0
    tablespaces: list[Tablespace] = field(default_factory=list)
    listing: PgdataListing | None = None
    changes: str | None = None  # how a diff/incr found its changed blocks (BackupStats.changes)
    owner: str = ""  # of PGDATA, by name
    group: str = ""
    stop: BackupStop | None = None
    copied: CopyResult = field(default_factory=CopyResult)

    def add(self, result: CopyResult) -> None:
        self.copied.files += result.files
        self.copied.objects += result.objects
        self.copied.warnings += result.warnings


def _archiving_warning(
    cluster: ClusterInfo, before: ArchiverStats, after: ArchiverStats
) -> ArchivingFailing | None:
    """The backup restores on its own, but PITR from it needs the archive: say when
    archive_command is failing (or failed while the backup ran)."""
    if cluster.archive_mode == "off" or not cluster.archive_command:
        return None
    problem = archiving_problem(after, before)
    return ArchivingFailing(problem, hint=ARCHIVING_HINT) if problem else None
