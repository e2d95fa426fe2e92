"""What a backup reads: the sources it stores, and how a diff/incr finds the blocks that changed.

`plan_sources` decides for each file of PGDATA whether it is stored whole, as the pages changed
since the parent, or only referenced; `changed_blocks` decides where a diff/incr learns which
blocks changed (the server's WAL summaries, the WAL itself, or a scan of every page of the changed
files) and `read_batches` turns a list of changed blocks into the reads that fetch them.
`wal_sources` is what makes a local backup consistent: backup_label and its WAL from pg_wal.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

from drkit.config.settings import BackupSettings
from drkit.errors import DrkitError, IntegrityError, ObjectNotFound
from drkit.fsutil import open_direct
from drkit.pg.constants import PAGE_SIZE
from drkit.pg.pages import relation_key, relation_segment
from drkit.pg.session import BackupStop, ClusterInfo, PgSession
from drkit.pg.summaries import ChangedBlocks, NoSummaries, SegmentReads
from drkit.pg.wal import check_segment_header, parse_lsn, parse_segment_name, segments_between
from drkit.pg.walblocks import SegmentSource, wal_changed_blocks
from drkit.pg.walk import PgdataListing, SourceFile
from drkit.repo.manifest import FileEntry, Manifest
from drkit.repo.repository import Repository
from drkit.repo.wal_archive import WalArchive

READ_CHUNK = 1024 * 1024  # a multiple of the page size, so page checks see whole pages
READ_GAP_PAGES = 8  # changed blocks closer than this are read in one go (WAL summaries)
MTIME_SAFETY_S = 2.0
# WAL up to this size is read for the changed blocks whatever the changed files weigh (~1 s)
WAL_SCAN_FREE = 1 << 30


class SourceStream(Protocol):
    """What a source opens: a file opened unbuffered, or an in-memory buffer."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class RangeReadable(Protocol):
    """A source read at offsets without a file descriptor (a server's file read over SQL)."""

    size: int  # when opened

    def pread_into(self, buffer: memoryview, offset: int, /) -> int: ...


# How a listed file is opened (remote mode reads over SQL; None: the local file system).
SourceOpener = Callable[[SourceFile], Callable[[], SourceStream]]


@dataclass(frozen=True)
class Delta:
    """Store only the pages changed since the parent backup started (diff/incr backups)."""

    since_lsn: int  # the parent's start LSN: older pages are the parent's pages
    parent_size: int  # blocks at or past the parent's end are new, always stored
    base: str  # label of the backup holding the older version of the file
    reads: SegmentReads | None = None  # only these blocks changed (WAL summaries); None: scan all
    # the source is PostgreSQL's INCREMENTAL file of the changed blocks (remote mode, 17+)
    incremental: bool = False


@dataclass(frozen=True)
class Source:
    """Something to store as one file of the backup."""

    path: str  # PGDATA-relative path it restores to
    size: int  # expected size, for planning; the bytes actually read are recorded
    mode: int
    mtime: float
    open: Callable[[], SourceStream]
    page_check_segment: int | None = None  # relation segment number, when pages are verified
    required: bool = False  # a required source that vanished fails the backup
    delta: Delta | None = None


def plan_sources(
    listing: PgdataListing,
    cluster: ClusterInfo,
    parent: Manifest | None,
    changed: ChangedBlocks | None,
    settings: BackupSettings,
    open_source: SourceOpener | None = None,
) -> tuple[list[Source], list[FileEntry]]:
    """What to read for each file: whole, only changed pages, or nothing (a reference).

    With a parent: a file whose size and mtime match the parent's (to the second, for a parent
    taken in remote mode, whose tar headers hold whole seconds), and whose mtime is safely
    before the parent started (a write in the same second as the parent's copy could leave the
    mtime unchanged), is referenced without being read. Main-fork relation files are stored as
    deltas of the pages changed since the parent started: with ``changed`` (WAL summaries) only
    the blocks it names and new blocks are read, else the whole file. A file in which they name
    more than ``scan_fraction`` of the parent's blocks is read whole all the same: that many
    scattered reads cost about what reading it all does, and a whole read stores XOR deltas
    (several times smaller, restored faster) proven by a whole-file checksum. Everything else
    (fsm and vm forks, which PostgreSQL may change without a new page LSN, and non-relation
    files) is stored whole. ``open_source``: how a file is opened (None: from the local
    file system).
    """
    previous = {f.path: f for f in parent.files} if parent else {}
    trusted_before = parent.start_time.timestamp() - MTIME_SAFETY_S if parent else 0.0
    since_lsn = parse_lsn(parent.start_lsn) if parent else 0
    sources: list[Source] = []
    unchanged: list[FileEntry] = []
    for f in listing.files:
        old = previous.get(f.path)
        if old and _unchanged(old, f, trusted_before):
            assert parent is not None
            unchanged.append(old.model_copy(update={"backup": old.owner(parent.label)}))
            continue
        segment = relation_segment(f.path)
        delta = None
        key = relation_key(f.path)  # main-fork relation files only
        if old and parent and segment is not None and key is not None:
            reads = None
            if changed is not None:
                reads = changed.segment_reads(key, segment, old.size // PAGE_SIZE)
            if reads is not None and reads.rewritten(f.size // PAGE_SIZE) > settings.scan_fraction:
                reads = None
            delta = Delta(since_lsn, old.size, parent.label, reads)
        direct = settings.direct_io and segment is not None and f.size >= READ_CHUNK
        opener = (
            open_source(f)
            if open_source is not None
            else partial(open_direct if direct else open_file, f.abspath)
        )
        sources.append(
            Source(
                f.path,
                f.size,
                f.mode,
                f.mtime,
                opener,
                page_check_segment=segment if cluster.data_checksums else None,
                delta=delta,
            )
        )
    return sources, unchanged


def plan_objects(
    sources: Iterable[Source], bundle_limit: int, bundle_size: int
) -> list[list[Source]]:
    """Group sources into objects, largest first so the parallel workers finish together."""
    singles: list[list[Source]] = []
    bundles: list[list[Source]] = []
    current: list[Source] = []
    current_size = 0
    for src in sorted(sources, key=lambda s: s.path):
        if src.size >= bundle_limit:
            singles.append([src])
            continue
        current.append(src)
        current_size += src.size
        if current_size >= bundle_size:
            bundles.append(current)
            current, current_size = [], 0
    if current:
        bundles.append(current)
    groups = singles + bundles
    groups.sort(key=lambda g: sum(s.size for s in g), reverse=True)
    return groups


@dataclass(frozen=True)
class ChangedBlocksFound:
    """Where a diff/incr learned which blocks changed, and what it learned."""

    changed: ChangedBlocks | None  # None: changed relation files are read whole
    source: str | None  # BackupStats.changes: "summaries", "wal", "scan"; None for a full
    notice: str | None = None  # why neither source could tell, when one was asked for


def changed_blocks(
    session: PgSession,
    cluster: ClusterInfo,
    repo: Repository,
    parent: Manifest | None,
    start_lsn: int,
    listing: PgdataListing,
    settings: BackupSettings,
    pg_wal: SegmentSource,
    archive_first: bool = False,
) -> ChangedBlocksFound:
    """The blocks changed since the parent started, from the server's WAL summaries (17+)
    or else from the WAL itself (None: changed files are read whole); where they came from
    (BackupStats.changes, None for a full); a notice when neither can tell though asked to. The
    WAL is not read when it is more than 1 GiB and twice the size of the relation files
    that changed: a scan of those costs less then. Its segments come from ``pg_wal`` (the
    server's) and the repository's archive, the archive first with ``archive_first``."""
    if parent is None:
        return ChangedBlocksFound(None, None)
    since = parse_lsn(parent.start_lsn)
    try:
        if settings.wal_summaries:
            changed = session.changed_blocks(
                cluster.version_num, cluster.timeline, since, start_lsn, settings.wal_summary_wait
            )
            if changed is not None:
                return ChangedBlocksFound(changed, "summaries")
        if settings.wal_scan:
            wal_bytes, file_bytes = start_lsn - since, _changed_relation_bytes(listing, parent)
            if wal_bytes > max(2 * file_bytes, WAL_SCAN_FREE):
                raise NoSummaries(
                    f"the WAL since the parent ({wal_bytes >> 20} MiB) outweighs the relation"
                    f" files that changed ({file_bytes >> 20} MiB)"
                )
            sources = [pg_wal, _archived_segment(WalArchive(repo))]
            if archive_first:
                sources.reverse()
            changed = wal_changed_blocks(
                sources,
                cluster.major,
                cluster.system_identifier,
                cluster.timeline,
                since,
                start_lsn,
                cluster.wal_segment_size,
            )
            return ChangedBlocksFound(changed, "wal")
    except NoSummaries as exc:
        return ChangedBlocksFound(None, "scan", f"{exc}: reading changed relation files whole")
    return ChangedBlocksFound(None, "scan")


def read_batches(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Reads covering the block ranges ``spans``: (offset, length) pieces of at most READ_CHUNK,
    grouped into batches of at most READ_CHUNK that fill one buffer. Ranges less than
    READ_GAP_PAGES apart are read as one (one larger read costs less than two)."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] < READ_GAP_PAGES:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    per_read = READ_CHUNK // PAGE_SIZE
    batches: list[list[tuple[int, int]]] = []
    room = 0
    for start, end in merged:
        for block in range(start, end, per_read):
            piece = (block * PAGE_SIZE, min(per_read, end - block) * PAGE_SIZE)
            if piece[1] > room:
                batches.append([])
                room = READ_CHUNK
            batches[-1].append(piece)
            room -= piece[1]
    return batches


def wal_sources(
    pgdata: Path, cluster: ClusterInfo, start_lsn: int, stop: BackupStop
) -> list[Source]:
    """backup_label, the WAL segments from the backup's start to its stop, and the timeline
    history files, from pg_wal (local mode), each required."""
    now = time.time()
    sources = [
        Source(
            "backup_label",
            len(stop.backup_label),
            0o600,
            now,
            partial(io.BytesIO, stop.backup_label),
            required=True,
        )
    ]
    segment_size = cluster.wal_segment_size
    for name in segments_between(stop.timeline, start_lsn, stop.lsn, segment_size):
        path = pgdata / "pg_wal" / name
        opener = partial(_open_segment, path, name, segment_size, cluster.system_identifier)
        sources.append(Source(f"pg_wal/{name}", segment_size, 0o600, now, opener, required=True))
    for history in sorted((pgdata / "pg_wal").glob("*.history")):
        sources.append(
            Source(
                f"pg_wal/{history.name}",
                history.stat().st_size,
                0o600,
                now,
                partial(open_file, history),
                required=True,
            )
        )
    return sources


def _open_segment(path: Path, name: str, segment_size: int, system_identifier: int) -> io.FileIO:
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


def open_file(path: Path) -> io.FileIO:
    """Open a source file unbuffered; the copier closes it."""
    return open(path, "rb", buffering=0)


def _unchanged(old: FileEntry, f: SourceFile, trusted_before: float) -> bool:
    return old.size == f.size and _same_mtime(old.mtime, f.mtime) and f.mtime < trusted_before


def _same_mtime(recorded: float, current: float) -> bool:
    """Whether a file's mtime is the one its parent recorded. A parent taken in remote mode
    recorded whole seconds (the server's tar headers), and a listing over SQL (a remote diff or
    incr before PostgreSQL 17) gives whole seconds: either is compared at that precision. That
    hides no change: a write after the parent's copy gives an mtime
    after the parent's start, which ``trusted_before`` refuses (remote mode keeps its start in
    the server's clock, which the mtimes are in)."""
    if recorded == current:
        return True
    if float(current).is_integer():
        return math.floor(recorded) == current
    return float(recorded).is_integer() and math.floor(current) == recorded


def _changed_relation_bytes(listing: PgdataListing, parent: Manifest) -> int:
    """Bytes of the relation files a diff/incr would read whole without the WAL's help."""
    previous = {f.path: f for f in parent.files}
    trusted_before = parent.start_time.timestamp() - MTIME_SAFETY_S
    return sum(
        f.size
        for f in listing.files
        if relation_key(f.path) is not None
        and (old := previous.get(f.path)) is not None
        and not _unchanged(old, f, trusted_before)
    )


def pg_wal_segments(pg_wal: Path) -> SegmentSource:
    """A WAL segment from pg_wal; None when it is not there, or was recycled (renamed to a
    later segment's name, to be overwritten) while being read."""

    def read(name: str) -> bytes | None:
        path = pg_wal / name
        try:
            with open(path, "rb", buffering=0) as stream:
                data = stream.readall()
                inode = os.fstat(stream.fileno()).st_ino
            return data if os.stat(path).st_ino == inode else None
        except FileNotFoundError:
            return None

    return read


def _archived_segment(archive: WalArchive) -> SegmentSource:
    """A WAL segment from the repository's archive (authenticated); None when not archived."""

    def read(name: str) -> bytes | None:
        try:
            return archive.read(name)
        except ObjectNotFound:
            return None
        except DrkitError as exc:
            raise NoSummaries(f"archived WAL segment {name} cannot be read: {exc}") from None

    return read
