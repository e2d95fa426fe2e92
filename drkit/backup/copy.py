"""The backup pipeline: read -> page check -> checksum -> zstd -> AEAD frame -> store, in parallel.

Sources are grouped into objects: a file of ``bundle_limit`` bytes or more is an object of its
own, smaller files are bundled (in path order) into objects of about ``bundle_size`` bytes, each
file an independently decodable frame inside its bundle, so one file restores with one ranged read.
Worker threads each build one object at a time, streaming: memory per worker is two read buffers
(one being read ahead) plus the codec's buffers, whatever the file sizes. zstd, sha256, AES-GCM
and numpy all release the GIL, which is why threads (not processes) scale here.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from drkit.codec.frame import FrameWriter
from drkit.config.settings import BackupSettings
from drkit.errors import DrkitWarning, PageChecksumFailure
from drkit.fsutil import pread_cached, pread_into, read_into
from drkit.pg.constants import PAGE_SIZE, RELSEG_PAGES
from drkit.pg.pages import check_pages, page_runs
from drkit.pg.summaries import SegmentReads
from drkit.pools import worker_pool
from drkit.progress import Progress
from drkit.repo.label import BackupLabel
from drkit.repo.layers import SECTION_PAGES
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.repository import Repository, file_context

if TYPE_CHECKING:
    from drkit.backup.base import BaseVersions

READ_CHUNK = 1024 * 1024  # a multiple of the page size, so page checks see whole pages
# Cores one file compressed in chunks keeps busy: its chunks compress on every core, but one
# thread reads, hashes and checks it, so a many-core host runs several such files at once.
CORES_PER_CHUNKED_FILE = 4
READ_GAP_PAGES = 8  # changed blocks closer than this are read in one go (WAL summaries)


class SourceStream(Protocol):
    """What a source opens: a file opened unbuffered, or an in-memory buffer."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Delta:
    """Store only the pages changed since the parent backup started (diff/incr backups)."""

    since_lsn: int  # the parent's start LSN: older pages are the parent's pages
    parent_size: int  # blocks at or past the parent's end are new, always stored
    base: str  # label of the backup holding the older version of the file
    reads: SegmentReads | None = None  # only these blocks changed (WAL summaries); None: scan all


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


@dataclass
class CopyResult:
    files: list[FileEntry] = field(default_factory=list)
    objects: list[ObjectEntry] = field(default_factory=list)
    warnings: list[DrkitWarning] = field(default_factory=list)


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


class FileCopier:
    """Stores sources as data objects of one backup. Safe to call ``copy`` several times."""

    def __init__(
        self,
        repo: Repository,
        label: BackupLabel,
        dek: bytes,
        settings: BackupSettings,
        progress: Progress,
        page_check_lsn: int | None,
        fanout: FanOutHook | None = None,
        base_versions: BaseVersions | None = None,
    ) -> None:
        self._repo = repo
        self._base_versions = base_versions  # the parent's pages, for XOR deltas
        self._label = label
        self._dek = dek
        self._settings = settings
        self._progress = progress
        self._page_check_lsn = page_check_lsn
        self._fanout = fanout  # copies each object to the other repositories as it is written
        self._next_index = 0
        self._lock = threading.Lock()
        # A file compressed in chunks keeps about CORES_PER_CHUNKED_FILE cores busy by itself.
        self._chunked_turns = threading.Semaphore(
            max(1, settings.process_max // CORES_PER_CHUNKED_FILE)
        )
        self._readers: ThreadPoolExecutor  # set by copy(): one read ahead per worker
        self._local = threading.local()  # per worker: its read buffers

    def copy(self, sources: list[Source]) -> CopyResult:
        groups = plan_objects(sources, self._settings.bundle_limit, self._settings.bundle_size)
        result = CopyResult()
        workers = self._settings.process_max
        with (
            worker_pool(workers, "backup") as pool,
            worker_pool(workers, "read") as readers,
        ):
            self._readers = readers
            for partial in pool.map(self._store_object, groups):
                result.files += partial.files
                result.objects += partial.objects
                result.warnings += partial.warnings
        result.files.sort(key=lambda f: f.path)
        result.objects.sort(key=lambda o: o.key)
        return result

    def _object_key(self) -> str:
        with self._lock:
            index = self._next_index
            self._next_index += 1
        return self._repo.data_key(self._label, index)

    def _store_object(self, group: list[Source]) -> CopyResult:
        with self._turn(group):
            key = self._object_key()
            copies = self._fanout.begin(key) if self._fanout is not None else None
            try:
                result = self._write_object(key, group, copies)
            except BaseException:
                if copies is not None:
                    copies.abandon()
                raise
            if copies is not None:
                copies.committed(result.objects[0])
            return result

    def _turn(self, group: list[Source]) -> AbstractContextManager[object]:
        """While copies stream to other repositories, files compressed in chunks take turns
        instead of sharing the cores: each is complete early, so its copies finish while the
        backup goes on rather than all at its end. (Without copies, sharing is a little faster.)"""
        chunked = len(group) == 1 and group[0].size > self._settings.chunk_size
        if chunked and self._fanout is not None and self._fanout.streaming:
            return self._chunked_turns
        return nullcontext()

    def _write_object(self, key: str, group: list[Source], copies: ObjectCopy | None) -> CopyResult:
        result = CopyResult()
        offset = 0
        with self._repo.storage.open_write(key) as writer:
            sink = writer.write if copies is None else _tee(writer.write, copies.write)
            for src in group:
                try:
                    stream = src.open()
                except FileNotFoundError:
                    if src.required:
                        raise
                    continue  # dropped while we ran (a dropped table); WAL replay agrees
                try:
                    entry, warnings = self._store_file(src, stream, sink, key, offset)
                finally:
                    stream.close()
                result.files.append(entry)
                result.warnings += warnings
                offset += entry.length
            written = writer.commit()
        result.objects.append(ObjectEntry(key=key, size=written.size, sha256=written.sha256))
        return result

    def _store_file(
        self,
        src: Source,
        stream: SourceStream,
        sink: Callable[[bytes], object],
        key: str,
        offset: int,
    ) -> tuple[FileEntry, list[DrkitWarning]]:
        size = 0  # of the file as read
        batches = None
        if src.delta is not None and src.delta.reads is not None:
            # WAL summaries say which blocks changed: read those (and new blocks) only
            size = os.fstat(stream.fileno()).st_size
            batches = _read_batches(src.delta.reads.spans(-(-size // PAGE_SIZE)))
            self._progress.advance(src.size)
        # A delta that reads the whole file (and so proves the restored file by its checksum)
        # stores its pages XORed with the parent's versions, as sparse pages
        base = self._base_versions
        if base is None or src.delta is None or batches is not None or src.delta.base != base.label:
            base = None
        # A file larger than a chunk is compressed in chunks on every core, and restored so too:
        # a big table (often most of a database) never keeps one worker busy alone.
        big = src.size > self._settings.chunk_size
        frame = FrameWriter(
            sink,
            self._dek,
            file_context(str(self._label), src.path),
            compress_level=self._settings.compress_level,
            segment_size=self._settings.segment_size,
            compress_threads=self._settings.process_max,
            chunk_size=self._settings.chunk_size if big or base is not None else None,
            sparse_pages=base is not None,
        )
        check = src.page_check_segment is not None and self._page_check_lsn is not None
        first_block = (src.page_check_segment or 0) * RELSEG_PAGES
        bad_pages: list[int] = []
        pages = _PageRanges() if src.delta is not None else None
        section = -1  # of the last XOR page written
        whole = hashlib.sha256()
        # The frame aborts on an error here: its compression threads never outlive the backup
        with frame, _ReadAhead(stream, self._readers, self._read_buffers(), batches) as chunks:
            for blocks, chunk in chunks:
                if src.delta is not None and pages is not None:
                    # Unchanged pages are the parent's, checked when the parent stored them.
                    if batches is None:
                        whole.update(chunk)
                    changed = changed_mask(chunk, blocks, src.delta)
                    if check:
                        bad_pages += self._check_pages(stream, chunk, first_block + blocks, changed)
                    if base is not None:
                        older = partial(base.pages, src.path)
                        xored = xor_changed(chunk, blocks, changed, older)
                        section = _write_by_section(
                            frame, xored, blocks[np.flatnonzero(changed)], section
                        )
                    for index, start, end in page_runs(changed, blocks):
                        if base is None:
                            frame.write(
                                chunk[index * PAGE_SIZE : (index + end - start) * PAGE_SIZE]
                            )
                        pages.add(start, end)
                else:
                    if check:
                        bad_pages += self._check_pages(stream, chunk, first_block + blocks)
                    frame.write(chunk)
                if batches is None:
                    size = int(blocks[0]) * PAGE_SIZE + len(chunk)
                    self._progress.advance(len(chunk))
            if base is not None:
                base.finish(src.path)
        info = frame.close()
        warnings: list[DrkitWarning] = [
            PageChecksumFailure(f"page checksum failure in '{src.path}' block {block}")
            for block in bad_pages
        ]
        delta = src.delta
        entry = FileEntry(
            path=src.path,
            size=size if src.delta is not None else info.plain_size,
            mode=src.mode,
            mtime=src.mtime,
            # A delta read from WAL summaries never saw the whole file: no whole-file checksum
            sha256=info.plain_sha256
            if src.delta is None
            else (whole.hexdigest() if batches is None else None),
            object=key,
            offset=offset,
            length=info.stored_size,
            bad_pages=bad_pages,
            pages=pages.ranges if pages is not None else None,
            base=delta.base if delta is not None else None,
            frame_sha256=info.plain_sha256 if delta is not None else None,
            xor=base is not None,
            chunks=[(c.plain_offset, c.payload_offset, c.plain_sha256) for c in info.chunks]
            if len(info.chunks) > 1
            else None,
        )
        return entry, warnings

    def _read_buffers(self) -> list[memoryview]:
        """This worker's two page-aligned read buffers, reused for every file it reads."""
        if not hasattr(self._local, "buffers"):
            self._local.buffers = [memoryview(mmap.mmap(-1, READ_CHUNK)) for _ in range(2)]
        buffers: list[memoryview] = self._local.buffers
        return buffers

    def _check_pages(
        self,
        stream: SourceStream,
        chunk: memoryview,
        blocks: np.ndarray,
        only: np.ndarray | None = None,
    ) -> list[int]:
        """Check the pages of ``chunk`` (relation block numbers ``blocks``); the blocks that
        fail, re-read or not."""
        assert self._page_check_lsn is not None
        failures = check_pages(chunk, blocks, self._page_check_lsn, only)
        bad: list[int] = []
        for failure in failures:
            # A page being written while we read it can look torn: read it once more.
            in_file = (failure.block % RELSEG_PAGES) * PAGE_SIZE
            again = pread_cached(stream.fileno(), PAGE_SIZE, in_file)
            if not check_pages(again, failure.block, self._page_check_lsn):
                continue
            bad.append(failure.block % RELSEG_PAGES)
        return bad


class ObjectCopy(Protocol):
    """The copies of one data object, fed while the object is written (drkit/repo/fanout.py)."""

    def write(self, data: bytes | memoryview) -> None: ...

    def committed(self, obj: ObjectEntry) -> None: ...

    def abandon(self) -> None: ...


class FanOutHook(Protocol):
    """Starts the copies of each data object as the backup starts writing it (None: none)."""

    @property
    def streaming(self) -> bool:
        """Whether any repository takes copies while the backup writes."""
        ...

    def begin(self, key: str) -> ObjectCopy | None: ...


def _tee(
    first: Callable[[bytes], object], second: Callable[[bytes], object]
) -> Callable[[bytes], None]:
    def both(data: bytes) -> None:
        first(data)
        second(data)

    return both


class _ReadAhead:
    """A stream's pages as (block numbers, bytes) of at most READ_CHUNK: the whole file in
    order, or the ``batches`` of (offset, length) pieces given, each batch gathered into one
    buffer. The next is read on a helper thread while the caller checks, hashes and compresses
    this one. The two buffers are page-aligned, as reads with O_DIRECT need
    (drkit.fsutil.open_direct)."""

    def __init__(
        self,
        stream: SourceStream,
        readers: ThreadPoolExecutor,
        buffers: list[memoryview],
        batches: list[list[tuple[int, int]]] | None = None,
    ) -> None:
        self._stream = stream
        self._readers = readers
        self._buffers = buffers
        self._batches = iter(batches) if batches is not None else None
        self._pending: Future[int] | None = None

    def __enter__(self) -> Iterator[tuple[np.ndarray, memoryview]]:
        return self._chunks()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pending is not None:
            wait([self._pending])  # the caller closes the stream next: no read may be in flight

    def _chunks(self) -> Iterator[tuple[np.ndarray, memoryview]]:
        turn, offset = 0, 0
        batch = self._submit(turn)
        while self._pending is not None and (n := self._pending.result()):
            current = self._buffers[turn][:n]
            blocks = _blocks_of(batch, n) if batch is not None else _blocks_at(offset, n)
            turn ^= 1
            offset += n
            batch = self._submit(turn)
            yield blocks, current

    def _submit(self, turn: int) -> list[tuple[int, int]] | None:
        """Start the next read into buffer ``turn``; the batch it gathers (None: whole file)."""
        buffer = self._buffers[turn]
        if self._batches is None:
            self._pending = self._readers.submit(read_into, self._stream, buffer)
            return None
        batch = next(self._batches, None)
        self._pending = (
            None if batch is None else self._readers.submit(_gather, self._stream, buffer, batch)
        )
        return batch


def _gather(stream: SourceStream, buffer: memoryview, batch: list[tuple[int, int]]) -> int:
    """Read the (offset, length) pieces one after the other into ``buffer``; bytes read (a
    short read, at the end of a file truncated meanwhile, ends the batch)."""
    filled = 0
    for offset, length in batch:
        n = pread_into(stream, buffer[filled : filled + length], offset)
        filled += n
        if n < length:
            break
    return filled


def _blocks_at(offset: int, n: int) -> np.ndarray:
    """Block numbers of the pages of ``n`` bytes read from ``offset``."""
    first = offset // PAGE_SIZE
    return np.arange(first, first + -(-n // PAGE_SIZE), dtype=np.int64)


def _blocks_of(batch: list[tuple[int, int]], n: int) -> np.ndarray:
    """Block numbers of the pages of the first ``n`` bytes gathered from ``batch``."""
    blocks = np.concatenate([_blocks_at(offset, length) for offset, length in batch])
    return blocks[: -(-n // PAGE_SIZE)]


def _read_batches(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
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


class _PageRanges:
    """Block ranges [start, end), merged as they are appended in ascending order."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], end)
        else:
            self.ranges.append((start, end))


def changed_pages(chunk: memoryview, first: int, delta: Delta) -> list[tuple[int, int]]:
    """Block ranges of ``chunk`` (pages from block ``first``) a delta must store."""
    blocks = _blocks_at(first * PAGE_SIZE, len(chunk))
    return [(start, end) for _, start, end in page_runs(changed_mask(chunk, blocks, delta), blocks)]


def xor_changed(
    chunk: memoryview,
    blocks: np.ndarray,
    changed: np.ndarray,
    older: Callable[[np.ndarray], np.ndarray],
) -> bytes:
    """The pages of ``chunk`` (block numbers ``blocks``) that ``changed`` selects, in order, each
    XORed with ``older``'s version of its block (a trailing partial page: its bytes only)."""
    selected = np.flatnonzero(changed)
    if not selected.size:
        return b""
    whole = len(chunk) // PAGE_SIZE
    pages = np.zeros((len(selected), PAGE_SIZE), dtype=np.uint8)
    inside = selected < whole
    full = np.frombuffer(chunk, dtype=np.uint8, count=whole * PAGE_SIZE)
    pages[inside] = full.reshape(whole, PAGE_SIZE)[selected[inside]]
    tail = len(chunk) - whole * PAGE_SIZE
    if not inside[-1]:  # the trailing partial page
        pages[-1, :tail] = np.frombuffer(chunk, dtype=np.uint8, offset=whole * PAGE_SIZE)
    pages ^= older(blocks[selected])
    data = pages.reshape(-1)
    return (data if inside[-1] else data[: len(data) - PAGE_SIZE + tail]).tobytes()


def _write_by_section(frame: FrameWriter, pages: bytes, blocks: np.ndarray, section: int) -> int:
    """Write XOR ``pages`` (of ``blocks``, the last page possibly partial) so that no chunk of
    the frame holds pages of two sections (SECTION_PAGES blocks): a restore rebuilds the file
    section by section, and each section then decodes only its own chunks. ``section``: that of
    the last page written before; returns that of the last page written now."""
    if not len(blocks):
        return section
    bounds = np.flatnonzero(np.diff(blocks // SECTION_PAGES)) + 1
    view = memoryview(pages)
    for a, b in itertools.pairwise([0, *bounds.tolist(), len(blocks)]):
        if int(blocks[a]) // SECTION_PAGES != section:
            frame.cut()
            section = int(blocks[a]) // SECTION_PAGES
        frame.write(view[a * PAGE_SIZE : b * PAGE_SIZE])
    return section


def changed_mask(chunk: memoryview, blocks: np.ndarray, delta: Delta) -> np.ndarray:
    """Which pages of ``chunk`` (block numbers ``blocks``) a delta must store: pages written
    since the parent started (LSN at or after its start), new all-zero pages (PostgreSQL may
    have truncated and re-extended the file: never trust the parent's old page there), pages
    past the parent's end, and a trailing partial page."""
    whole = len(chunk) // PAGE_SIZE
    changed = blocks[: -(-len(chunk) // PAGE_SIZE)] >= delta.parent_size // PAGE_SIZE
    if whole:
        header = np.frombuffer(chunk, dtype="<u4", count=whole * PAGE_SIZE // 4).reshape(
            whole, PAGE_SIZE // 4
        )[:, :4]
        lsn = (header[:, 0].astype(np.uint64) << np.uint64(32)) | header[:, 1].astype(np.uint64)
        upper = header[:, 3] >> np.uint32(16)
        changed[:whole] |= (lsn >= np.uint64(delta.since_lsn)) | (upper == 0)
    if len(changed) > whole:
        changed[whole] = True
    return changed
