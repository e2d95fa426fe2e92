"""One writer per way a file is stored: whole, as changed pages, as WAL-named blocks, as XOR pages.

`file_writer` picks the mode from the source's plan. Each writer takes the file's chunks as the
copier reads them (block numbers and bytes), writes what its mode keeps into the file's frame, and
then says what the manifest records about the file:

- WholeFile: every byte (files without a parent version, and non-relation files);
- PageDelta: the pages changed since the parent started, read from a scan of the whole file,
  which also proves the restored file by its whole-file checksum;
- WalBlocks: a PageDelta that reads only the blocks the WAL (or its summaries) names, so it never
  sees the whole file and records no whole-file checksum;
- XorDelta: a PageDelta whose pages are stored XORed with the parent's versions, as sparse pages
  (nearly all zeros for a small change, so they compress to almost nothing);
- PgIncremental: PostgreSQL's INCREMENTAL file of a relation segment (remote mode, 17+), stored
  as a delta of plain pages like WalBlocks.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from drkit.backup.plan import Delta, RangeReadable, Source, SourceStream, read_batches
from drkit.codec.frame import FrameInfo
from drkit.codec.frame_writer import FrameWriter
from drkit.config.settings import BackupSettings
from drkit.errors import DrkitWarning, PageChecksumFailure, PostgresError
from drkit.fsutil import pread_cached
from drkit.pg.constants import PAGE_SIZE, RELSEG_PAGES
from drkit.pg.incremental import read_incremental_header
from drkit.pg.pages import check_pages, page_runs
from drkit.progress import Progress
from drkit.repo.label import BackupLabel
from drkit.repo.layers import SECTION_PAGES
from drkit.repo.manifest import FileEntry
from drkit.repo.repository import file_context

if TYPE_CHECKING:
    from drkit.backup.base import BaseVersions

Batches = list[list[tuple[int, int]]]


@dataclass(frozen=True)
class CopyJob:
    """What every file of one backup is stored with."""

    label: BackupLabel
    dek: bytes
    settings: BackupSettings
    progress: Progress
    page_check_lsn: int | None  # pages are checked when the cluster has data checksums


def file_writer(
    job: CopyJob, src: Source, stream: SourceStream, base: BaseVersions | None
) -> FileWriter:
    """The writer for `src`'s mode; `base`: the parent's pages, when deltas may be XORed."""
    delta = src.delta
    if delta is None:
        return WholeFile(job, src, stream)
    if delta.incremental:
        return PgIncremental(job, src, stream, delta)
    if delta.reads is not None:
        return WalBlocks(job, src, stream, delta)
    if base is not None and delta.base == base.label:
        return XorDelta(job, src, stream, delta, base)
    return PageDelta(job, src, stream, delta)


class FileWriter:
    """Stores one source as one frame: `open_frame`, `take` each chunk, `finish`, then `entry`
    of the closed frame."""

    sparse = False  # the frame holds sparse (XOR) pages

    def __init__(self, job: CopyJob, src: Source, stream: SourceStream) -> None:
        self.job = job
        self.src = src
        self.stream = stream
        self.batches: Batches | None = None  # None: the whole file is read, in order
        self.size = 0  # of the file as read
        self.bad_pages: list[int] = []
        self._check = src.page_check_segment is not None and job.page_check_lsn is not None
        self._first_block = (src.page_check_segment or 0) * RELSEG_PAGES

    def open_frame(self, sink: Callable[[bytes], object]) -> FrameWriter:
        settings = self.job.settings
        # A file larger than a chunk is compressed in chunks on every core, and restored so too:
        # a big table (often most of a database) never keeps one worker busy alone.
        big = self.src.size > settings.chunk_size
        return FrameWriter(
            sink,
            self.job.dek,
            file_context(str(self.job.label), self.src.path),
            compress_level=settings.compress_level,
            segment_size=settings.segment_size,
            compress_threads=settings.process_max,
            chunk_size=settings.chunk_size if big or self.sparse else None,
            sparse_pages=self.sparse,
        )

    def take(self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview) -> None:
        """Store what this mode keeps of `chunk` (pages of block numbers `blocks`)."""
        self._take(frame, blocks, chunk)
        if self.batches is None:
            self.size = int(blocks[0]) * PAGE_SIZE + len(chunk)
            self.job.progress.advance(len(chunk))

    def _take(self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once every chunk was taken, before the frame is closed."""

    def entry(self, info: FrameInfo, key: str, offset: int) -> FileEntry:
        """The manifest's record of the file, stored at `offset` of object `key`."""
        raise NotImplementedError

    def warnings(self) -> list[DrkitWarning]:
        return [
            PageChecksumFailure(f"page checksum failure in '{self.src.path}' block {block}")
            for block in self.bad_pages
        ]

    def _check_pages(
        self, chunk: memoryview, blocks: np.ndarray, only: np.ndarray | None = None
    ) -> list[int]:
        """Check the pages of ``chunk`` (file block numbers ``blocks``); the blocks that fail,
        re-read or not."""
        lsn = self.job.page_check_lsn
        assert lsn is not None
        failures = check_pages(chunk, self._first_block + blocks, lsn, only)
        bad: list[int] = []
        for failure in failures:
            # A page being written while we read it can look torn: read it once more. (A page
            # from a replication stream cannot be; the server re-read it before sending it.)
            in_file = (failure.block % RELSEG_PAGES) * PAGE_SIZE
            again = _read_again(self.stream, in_file)
            if again is not None and not check_pages(again, failure.block, lsn):
                continue
            bad.append(failure.block % RELSEG_PAGES)
        return bad


def _read_again(stream: SourceStream, offset: int) -> bytes | None:
    """The page at ``offset`` of the stream's file, read again; None for a stream that cannot
    (held in memory, or read from a replication stream)."""
    if isinstance(stream, RangeReadable):
        page = bytearray(PAGE_SIZE)
        n = stream.pread_into(memoryview(page), offset)
        return bytes(page[:n])
    try:
        fd = stream.fileno()
    except OSError:  # io.UnsupportedOperation
        return None
    return pread_cached(fd, PAGE_SIZE, offset)


class WholeFile(FileWriter):
    """Stores every byte of the file."""

    def _take(self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview) -> None:
        if self._check:
            self.bad_pages += self._check_pages(chunk, blocks)
        frame.write(chunk)

    def entry(self, info: FrameInfo, key: str, offset: int) -> FileEntry:
        return FileEntry(
            path=self.src.path,
            size=info.plain_size,
            mode=self.src.mode,
            mtime=self.src.mtime,
            sha256=info.plain_sha256,
            object=key,
            offset=offset,
            length=info.stored_size,
            bad_pages=self.bad_pages,
            chunks=_chunks(info),
        )


class PageDelta(FileWriter):
    """Stores the pages changed since the parent started (`changed_mask`), from a whole read."""

    def __init__(self, job: CopyJob, src: Source, stream: SourceStream, delta: Delta) -> None:
        super().__init__(job, src, stream)
        self.delta = delta
        self.pages = _PageRanges()
        self._whole: hashlib._Hash | None = hashlib.sha256()

    def _take(self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview) -> None:
        # Unchanged pages are the parent's, checked when the parent stored them.
        if self._whole is not None:
            self._whole.update(chunk)
        changed = changed_mask(chunk, blocks, self.delta)
        if self._check:
            self.bad_pages += self._check_pages(chunk, blocks, changed)
        self._store_changed(frame, blocks, chunk, changed)

    def _store_changed(
        self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview, changed: np.ndarray
    ) -> None:
        for index, start, end in page_runs(changed, blocks):
            frame.write(chunk[index * PAGE_SIZE : (index + end - start) * PAGE_SIZE])
            self.pages.add(start, end)

    def entry(self, info: FrameInfo, key: str, offset: int) -> FileEntry:
        return FileEntry(
            path=self.src.path,
            size=self.size,
            mode=self.src.mode,
            mtime=self.src.mtime,
            sha256=self._whole.hexdigest() if self._whole is not None else None,
            object=key,
            offset=offset,
            length=info.stored_size,
            bad_pages=self.bad_pages,
            pages=self.pages.ranges,
            base=self.delta.base,
            frame_sha256=info.plain_sha256,
            xor=self.sparse,
            chunks=_chunks(info),
        )


class WalBlocks(PageDelta):
    """A PageDelta that reads only the blocks the WAL names, and new blocks: it never sees the
    whole file, so it records no whole-file checksum."""

    def __init__(self, job: CopyJob, src: Source, stream: SourceStream, delta: Delta) -> None:
        super().__init__(job, src, stream, delta)
        assert delta.reads is not None
        self._whole = None
        self.size = (
            stream.size if isinstance(stream, RangeReadable) else os.fstat(stream.fileno()).st_size
        )
        self.batches = read_batches(delta.reads.spans(-(-self.size // PAGE_SIZE)))
        job.progress.advance(src.size)


class PgIncremental(PageDelta):
    """A delta read from PostgreSQL's INCREMENTAL file of a segment (drkit/pg/incremental.py):
    its header names the blocks that follow and the file's length. Stored as plain pages: the
    blocks it holds, and a zero page for each block it says is zeros (not sent, and at or past its
    truncation length or the parent's end); every other block is the parent's. The chunks it
    takes are the pages after the header, numbered by their position in the block list. Like
    WalBlocks it never sees the whole file, so it records no whole-file checksum."""

    def __init__(self, job: CopyJob, src: Source, stream: SourceStream, delta: Delta) -> None:
        super().__init__(job, src, stream, delta)
        self._whole = None
        self.header = read_incremental_header(partial(_read_exact, stream), src.path)
        self.size = self.header.length * PAGE_SIZE
        self._zeros_from = min(self.header.truncation, -(-delta.parent_size // PAGE_SIZE))
        self._next = 0  # the block after the last one stored
        self._received = 0
        self._frame: FrameWriter | None = None

    def open_frame(self, sink: Callable[[bytes], object]) -> FrameWriter:
        self._frame = super().open_frame(sink)
        return self._frame

    def take(self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview) -> None:
        numbers = self.header.blocks
        if len(chunk) % PAGE_SIZE or (len(blocks) and int(blocks[-1]) >= len(numbers)):
            raise PostgresError(
                f"the server's incremental file of '{self.src.path}' holds more than the"
                f" {len(numbers)} blocks its header names"
            )
        held = numbers[blocks]
        if self._check:
            self.bad_pages += self._check_pages(chunk, held)
        for index, start, end in page_runs(np.ones(len(held), dtype=bool), held):
            self._zeros(frame, start)
            frame.write(chunk[index * PAGE_SIZE : (index + end - start) * PAGE_SIZE])
            self.pages.add(start, end)
            self._next = end
        self._received += len(held)
        self.job.progress.advance(len(chunk))

    def finish(self) -> None:
        if self._received != len(self.header.blocks):
            raise PostgresError(
                f"the server's incremental file of '{self.src.path}' ended after"
                f" {self._received} of the {len(self.header.blocks)} blocks its header names"
            )
        assert self._frame is not None
        self._zeros(self._frame, self.header.length)

    def _zeros(self, frame: FrameWriter, end: int) -> None:
        """Store zero pages for the blocks before ``end`` that are zeros."""
        start = max(self._next, self._zeros_from)
        for block in range(start, end, _ZERO_PAGES):
            count = min(_ZERO_PAGES, end - block)
            frame.write(_ZEROS[: count * PAGE_SIZE])
            self.pages.add(block, block + count)
        self._next = max(self._next, end)


_ZERO_PAGES = 128
_ZEROS = memoryview(bytes(_ZERO_PAGES * PAGE_SIZE))


def _read_exact(stream: SourceStream, n: int) -> bytes:
    """``n`` bytes of ``stream`` (fewer at its end)."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    filled = 0
    while filled < n:
        got = stream.readinto(view[filled:])
        if not got:
            break
        filled += got
    return bytes(buffer[:filled])


class XorDelta(PageDelta):
    """A PageDelta whose pages are stored XORed with the parent's versions, as sparse pages."""

    sparse = True

    def __init__(
        self, job: CopyJob, src: Source, stream: SourceStream, delta: Delta, base: BaseVersions
    ) -> None:
        super().__init__(job, src, stream, delta)
        self._base = base
        self._section = -1  # of the last XOR page written

    def _store_changed(
        self, frame: FrameWriter, blocks: np.ndarray, chunk: memoryview, changed: np.ndarray
    ) -> None:
        older = partial(self._base.pages, self.src.path)
        xored = xor_changed(chunk, blocks, changed, older)
        self._section = _write_by_section(
            frame, xored, blocks[np.flatnonzero(changed)], self._section
        )
        for _, start, end in page_runs(changed, blocks):
            self.pages.add(start, end)

    def finish(self) -> None:
        self._base.finish(self.src.path)


def _chunks(info: FrameInfo) -> list[tuple[int, int, str]] | None:
    if len(info.chunks) <= 1:
        return None
    return [(c.plain_offset, c.payload_offset, c.plain_sha256) for c in info.chunks]


class _PageRanges:
    """Block ranges [start, end), merged as they are appended in ascending order."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1] = (self.ranges[-1][0], end)
        else:
            self.ranges.append((start, end))


def blocks_at(offset: int, n: int) -> np.ndarray:
    """Block numbers of the pages of ``n`` bytes read from ``offset``."""
    first = offset // PAGE_SIZE
    return np.arange(first, first + -(-n // PAGE_SIZE), dtype=np.int64)


def changed_pages(chunk: memoryview, first: int, delta: Delta) -> list[tuple[int, int]]:
    """Block ranges of ``chunk`` (pages from block ``first``) a delta must store."""
    blocks = blocks_at(first * PAGE_SIZE, len(chunk))
    return [(start, end) for _, start, end in page_runs(changed_mask(chunk, blocks, delta), blocks)]


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
