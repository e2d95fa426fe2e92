"""Remote mode: a backup's files from a base backup over a replication connection.

The server's tar archives (drkit/pg/basebackup.py) are read as a stream, member by member, and
turned into the same sources the local engine stores, so they go through the same pipeline
(page checks, checksums, zstd, AEAD frames, bundles, fan-out) into the same repository format.
Nothing is written to local disk: a file smaller than ``bundle_limit`` is held in memory until
its bundle is stored (at most ``process_max`` bundles at once), a larger one is stored straight
from the stream before the stream moves on.

The server applies PostgreSQL's own exclusions (pg_wal contents, temporary files, unlogged
relations but their init fork, ...); what drkit adds is the WAL from the backup's start to its
end, which the server sends in PGDATA's archive and drkit keeps as ``pg_wal/<segment>`` like the
local engine, each segment's header checked first (its position and system identifier).
Tablespace files are addressed as ``pg_tblspc/<oid>/...``, as locally.

A diff/incr is PostgreSQL's incremental base backup (17+, ``summarize_wal = on``) on top of the
parent: the server gets a manifest of the parent's files (drkit/pg/incremental.py) and sends each
relation file that changed in part as ``INCREMENTAL.<name>``, which is stored under its own name
as a delta of the parent (file_writers.PgIncremental), so restore, verify and chains read it like
any delta. One that names no block and keeps the parent's length is stored as a reference to the
parent's version; backup_label loses the lines that would mark the restored directory as an
incremental backup. Without the server's summaries, a diff/incr reads the data directory over
SQL instead (backup/remote_sql.py): ``remote_incremental`` decides which.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

from drkit.backup.copy import CopyResult, FileCopier, StreamedGroup
from drkit.backup.plan import Delta, Source
from drkit.config.settings import BackupSettings, Settings
from drkit.errors import IntegrityError, PageChecksumFailure, PostgresError
from drkit.pg.basebackup import (
    INCREMENTAL_MIN_VERSION,
    Archive,
    BaseBackupStream,
    IncrementalRefused,
)
from drkit.pg.constants import PAGE_SIZE
from drkit.pg.incremental import (
    HEADER_FIELDS,
    backup_manifest,
    incremental_target,
    read_incremental_header,
    without_incremental_lines,
)
from drkit.pg.pages import relation_segment
from drkit.pg.remote_files import FILE_FUNCTIONS
from drkit.pg.session import BackupStop, ClusterInfo, PgSession, Tablespace
from drkit.pg.tarstream import Member, TarStream
from drkit.pg.wal import check_segment_header, parse_lsn, parse_segment_name
from drkit.pg.walk import PgdataListing, SourceDir, SourceLink
from drkit.progress import Progress
from drkit.repo.manifest import FileEntry, Manifest

WAL_HEADER_BYTES = 64  # a WAL segment's long page header, checked before it is stored
_WAL_SEGMENT = re.compile(r"^pg_wal/[0-9A-F]{24}$")


@dataclass
class RemoteBackup:
    """What a base backup over the replication protocol gathered, for the manifest."""

    start_lsn: int = 0
    listing: PgdataListing = field(
        default_factory=lambda: PgdataListing(files=[], dirs=[], links=[], tablespace_dirs={})
    )
    tablespaces: list[Tablespace] = field(default_factory=list)
    stop: BackupStop | None = None
    copied: CopyResult = field(default_factory=CopyResult)
    owner: str = "postgres"
    group: str = "postgres"
    backup_label: bytes = b""
    unchanged: list[FileEntry] = field(default_factory=list)  # references to the parent's files


@dataclass(frozen=True)
class _Prior:
    """The backup an incremental one builds on: its label and its files by path."""

    label: str
    files: dict[str, FileEntry]


class RemoteIncremental(Enum):
    """How a remote diff/incr reads what changed since its parent."""

    BASE_BACKUP = "base backup"  # the server's incremental base backup (this module)
    SQL = "sql"  # the data directory read over SQL (backup/remote_sql.py)


def remote_incremental(
    session: PgSession,
    cluster: ClusterInfo,
    settings: BackupSettings,
    refused: IncrementalRefused | None = None,
) -> RemoteIncremental | str:
    """How a remote diff/incr is taken, or why it cannot be (a string: it falls back to a
    full). On 17+ with the server's WAL summaries (and backup.wal_summaries), its incremental
    base backup, which needs no grant beyond a full's; otherwise, or once the server
    ``refused`` one, the data directory read over SQL, whose grants the role check requires
    before 17 and this checks from 17 on, since only a server without summaries needs them."""
    if cluster.version_num < INCREMENTAL_MIN_VERSION:
        return RemoteIncremental.SQL
    if refused is not None:
        why = f"the server refused an incremental backup ({refused})"
    elif not settings.wal_summaries:
        why = "backup.wal_summaries is off"
    elif not session.summarize_wal():
        why = "summarize_wal is off on the server"
    else:
        return RemoteIncremental.BASE_BACKUP
    missing = session.missing_function_grants(FILE_FUNCTIONS)
    if not missing:
        return RemoteIncremental.SQL
    return (
        f"{why}, and reading the changed blocks over SQL instead needs EXECUTE on"
        f" {', '.join(missing)} (set summarize_wal = on, or grant those functions to the"
        " role: docs/remote.md)"
    )


def take_remote(
    settings: Settings,
    session: PgSession,
    cluster: ClusterInfo,
    label: str,
    make_copier: Callable[[int], FileCopier],
    progress: Progress,
    parent: Manifest | None = None,
) -> RemoteBackup:
    """Run BASE_BACKUP and store every file it sends; ``make_copier(start_lsn)`` gives the
    copier (pages are checked against the backup's start). ``session`` holds the temporary slot
    that keeps the backup's WAL in pg_wal until the server has sent it. With ``parent``, an
    incremental backup on top of it (IncrementalRefused when the server cannot take one)."""
    taken = RemoteBackup()
    names = {t.oid: t.name for t in session.tablespaces()}
    prior = _Prior(parent.label, {f.path: f for f in parent.files}) if parent else None
    with BaseBackupStream(settings.postgres.conninfo()) as stream:
        stream.start(label, settings.backup.start_fast, _prior_manifest(parent, cluster))
        taken.start_lsn = stream.start_lsn
        copier = make_copier(stream.start_lsn)
        progress.start(f"backup {label}", 0)
        groups = _groups(stream, taken, cluster, settings, names, prior)
        taken.copied = copier.copy_stream(groups)
        progress.stop()
        end = stream.end()
    if end.damaged_pages and not any(f.bad_pages for f in taken.copied.files):
        # drkit's own checks name each damaged page; should the server's have found one they
        # did not, its words name the file and block
        found = "; ".join(stream.warnings) or "see the server log for the file and block"
        taken.copied.warnings.append(
            PageChecksumFailure(f"the server found pages that failed their checksums: {found}")
        )
    if not taken.backup_label:
        raise PostgresError("the server's base backup holds no backup_label")
    taken.stop = BackupStop(end.lsn, session.next_xid(), taken.backup_label, b"")
    taken.listing.dirs.sort(key=lambda d: d.path)
    taken.copied.files = sorted(taken.copied.files + taken.unchanged, key=lambda f: f.path)
    return taken


def _prior_manifest(parent: Manifest | None, cluster: ClusterInfo) -> bytes | None:
    """The parent's files and WAL range as the server's incremental backup needs them (None:
    a full backup). Synthesized from drkit's manifest, so a parent taken by either engine serves;
    its own WAL (pg_wal) is left out, as PostgreSQL's manifests leave it out."""
    if parent is None:
        return None
    files = ((f.path, f.size) for f in parent.files if not f.path.startswith("pg_wal/"))
    start, stop = parse_lsn(parent.start_lsn), parse_lsn(parent.stop_lsn)
    return backup_manifest(cluster.system_identifier, files, parent.timeline, start, stop)


def _groups(
    stream: BaseBackupStream,
    taken: RemoteBackup,
    cluster: ClusterInfo,
    settings: Settings,
    names: dict[int, str],
    prior: _Prior | None,
) -> Iterator[StreamedGroup]:
    """The objects to store, in the order the stream holds their files: bundles of small files
    read into memory, and each large file alone, read from the stream by the worker storing it."""
    limit, bundle_size = settings.backup.bundle_limit, settings.backup.bundle_size
    bundle: list[Source] = []
    held = 0
    for archive in stream.archives():
        prefix = _archive_prefix(archive, taken, names)
        tar = TarStream(archive, archive.name)
        for member in tar:
            released = threading.Event()
            source = _member(tar, member, prefix, taken, cluster, limit, released, prior)
            if source is None:
                continue
            if source.size >= limit:
                if bundle:
                    yield StreamedGroup(bundle)
                    bundle, held = [], 0
                yield StreamedGroup([source], released)
                continue
            bundle.append(source)
            held += source.size
            if held >= bundle_size:
                yield StreamedGroup(bundle)
                bundle, held = [], 0
    if bundle:
        yield StreamedGroup(bundle)


def _archive_prefix(archive: Archive, taken: RemoteBackup, names: dict[int, str]) -> str:
    if archive.tablespace is None:
        return ""
    oid = archive.tablespace
    taken.tablespaces.append(Tablespace(oid, names.get(oid, str(oid)), Path(archive.location)))
    return f"pg_tblspc/{oid}/"


def _member(
    tar: TarStream,
    member: Member,
    prefix: str,
    taken: RemoteBackup,
    cluster: ClusterInfo,
    limit: int,
    released: threading.Event,
    prior: _Prior | None = None,
) -> Source | None:
    """The source of a regular file (None for anything else, recorded where the manifest needs
    it: directories, symlinks other than the tablespaces' links; and for an incremental file
    that leaves the parent's version as it was, recorded as a reference to it)."""
    path = _relative(prefix + member.name)
    taken.owner, taken.group = member.uname or taken.owner, member.gname or taken.group
    mode = member.mode & 0o7777
    if member.isdir():
        taken.listing.dirs.append(SourceDir(path, mode))
        return None
    if member.issym():
        parent, _, name = path.rpartition("/")
        if not (parent == "pg_tblspc" and name.isdigit()):  # tablespaces: from their archives
            taken.listing.links.append(SourceLink(path, member.linkname))
        return None
    if not member.isfile() or path.startswith("pg_wal/archive_status/"):
        return None
    delta = None
    if prior is not None and (target := incremental_target(path)) is not None:
        path, delta = target, _delta_of(target, prior)
    segment = relation_segment(path) if cluster.data_checksums else None
    required = path == "backup_label" or path.startswith("pg_wal/")
    check = partial(_check_wal, path, cluster) if _WAL_SEGMENT.match(path) else None
    if member.size >= limit:
        streamed = partial(_StreamedFile, tar, released, check)
        return Source(path, member.size, mode, member.mtime, streamed, segment, required, delta)
    data = tar.read()
    if check is not None:
        check(data)
    if path == "backup_label":
        data = taken.backup_label = without_incremental_lines(data)
    if delta is not None and prior is not None and len(data) == HEADER_FIELDS:
        header = read_incremental_header(io.BytesIO(data).read, member.name)
        if not len(header.blocks) and header.length * PAGE_SIZE == delta.parent_size:
            old = prior.files[path]
            taken.unchanged.append(old.model_copy(update={"backup": old.owner(prior.label)}))
            return None
    opener = partial(io.BytesIO, data)
    return Source(path, len(data), mode, member.mtime, opener, segment, required, delta)


def _delta_of(path: str, prior: _Prior) -> Delta:
    """How an INCREMENTAL file of ``path`` is stored: a delta of the parent's version."""
    old = prior.files.get(path)
    if old is None:
        raise PostgresError(
            f"the server sent an incremental file of '{path}', which backup '{prior.label}'"
            " does not have"
        )
    return Delta(0, old.size, prior.label, incremental=True)


class _StreamedFile:
    """A large file read from the stream by the worker that stores it: reads fill the buffer
    (the page checks need whole pages), and its end sets ``released`` (the stream may move on);
    there is no file descriptor to re-read a page from."""

    def __init__(
        self,
        reader: TarStream,
        released: threading.Event,
        check: Callable[[bytes], None] | None = None,
    ) -> None:
        self._reader = reader
        self._released = released
        self._check = check  # of the file's first bytes

    def readinto(self, buffer: memoryview, /) -> int:
        filled = self._fill(buffer)
        if self._check is not None:
            self._check(bytes(buffer[: min(filled, WAL_HEADER_BYTES)]))
            self._check = None
        return filled

    def _fill(self, buffer: memoryview) -> int:
        filled = 0
        while filled < len(buffer) and not self._released.is_set():
            n = self._reader.readinto(buffer[filled:])
            if not n:
                # the file's end: from now on the stream's bytes are the next member's
                self._released.set()
                break
            filled += n
        return filled

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a file read from a replication stream has no descriptor")

    def close(self) -> None:
        self._released.set()


def _check_wal(path: str, cluster: ClusterInfo, head: bytes) -> None:
    """Refuse a WAL segment that is not the one its name says (as the local engine does)."""
    _, segno = parse_segment_name(path.removeprefix("pg_wal/"), cluster.wal_segment_size)
    problem = check_segment_header(head, segno, cluster.wal_segment_size, cluster.system_identifier)
    if problem:
        raise IntegrityError(f"WAL segment '{path}' sent by the server {problem}")


def _relative(name: str) -> str:
    """A member's PGDATA-relative path, refusing one that would leave PGDATA."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        raise PostgresError(f"the server's base backup holds an unexpected path '{name}'")
    return "/".join(parts)
