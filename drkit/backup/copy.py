"""The backup pipeline: read -> page check -> checksum -> zstd -> AEAD frame -> store, in parallel.

Sources are grouped into objects: a file of ``bundle_limit`` bytes or more is an object of its
own, smaller files are bundled (in path order) into objects of about ``bundle_size`` bytes, each
file an independently decodable frame inside its bundle, so one file restores with one ranged read.
Worker threads each build one object at a time, streaming: memory per worker is two read buffers
(one being read ahead) plus the codec's buffers, whatever the file sizes. zstd, sha256, AES-GCM
and numpy all release the GIL, which is why threads (not processes) scale here.

What to read comes from plan.py; how each file is stored (whole, changed pages, WAL-named blocks,
XOR pages) is decided by its writer in file_writers.py.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import numpy as np

from drkit.backup.file_writers import CopyJob, blocks_at, file_writer
from drkit.backup.plan import READ_CHUNK, RangeReadable, Source, SourceStream, plan_objects
from drkit.config.settings import BackupSettings
from drkit.errors import DrkitWarning
from drkit.fsutil import pread_into, read_into
from drkit.pg.constants import PAGE_SIZE
from drkit.pools import worker_pool
from drkit.progress import Progress
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.repository import Repository

if TYPE_CHECKING:
    from drkit.backup.base import BaseVersions

# Cores one file compressed in chunks keeps busy: its chunks compress on every core, but one
# thread reads, hashes and checks it, so a many-core host runs several such files at once.
CORES_PER_CHUNKED_FILE = 4


@dataclass
class CopyResult:
    files: list[FileEntry] = field(default_factory=list)
    objects: list[ObjectEntry] = field(default_factory=list)
    warnings: list[DrkitWarning] = field(default_factory=list)


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
        self._job = CopyJob(label, dek, settings, progress, page_check_lsn)
        self._settings = settings
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

    def copy_stream(self, groups: Iterable[StreamedGroup]) -> CopyResult:
        """Store groups as a stream read once, in order, yields them (remote mode): each group
        goes to the next free worker, at most ``process_max`` at once, so memory stays bounded;
        a group that reads the stream itself is read to its end (``released``) before the
        stream moves on, while its last chunks are still compressed and stored."""
        result = CopyResult()
        workers = self._settings.process_max
        pending: deque[Future[CopyResult]] = deque()
        with (
            worker_pool(workers, "backup") as pool,
            worker_pool(workers, "read") as readers,
        ):
            self._readers = readers
            for group in groups:
                while len(pending) >= workers:
                    _merge(result, pending.popleft().result())
                future = pool.submit(self._store_object, group.sources)
                if group.released is not None:
                    # the stream's next bytes are this file's; a failed worker releases it too
                    future.add_done_callback(_release(group.released))
                    group.released.wait()
                    if future.done():
                        future.result()  # raises the worker's error
                pending.append(future)
            while pending:
                _merge(result, pending.popleft().result())
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
        writer = file_writer(self._job, src, stream, self._base_versions)
        frame = writer.open_frame(sink)
        # The frame aborts on an error here: its compression threads never outlive the backup
        with (
            frame,
            _ReadAhead(stream, self._readers, self._read_buffers(), writer.batches) as chunks,
        ):
            for blocks, chunk in chunks:
                writer.take(frame, blocks, chunk)
            writer.finish()
        info = frame.close()
        return writer.entry(info, key, offset), writer.warnings()

    def _read_buffers(self) -> list[memoryview]:
        """This worker's two page-aligned read buffers, reused for every file it reads."""
        if not hasattr(self._local, "buffers"):
            self._local.buffers = [memoryview(mmap.mmap(-1, READ_CHUNK)) for _ in range(2)]
        buffers: list[memoryview] = self._local.buffers
        return buffers


@dataclass(frozen=True)
class StreamedGroup:
    """The sources of one object taken from a stream (``FileCopier.copy_stream``)."""

    sources: list[Source]
    # set once its one source has read its bytes from the stream (None: held in memory)
    released: threading.Event | None = None


def _release(event: threading.Event) -> Callable[[Future[CopyResult]], None]:
    return lambda _: event.set()


def _merge(result: CopyResult, part: CopyResult) -> None:
    result.files += part.files
    result.objects += part.objects
    result.warnings += part.warnings


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
        # The caller closes the stream next: no read may be in flight. A read the pool cancelled
        # on an error (shutdown with cancel_futures) never runs; concurrent.futures.wait() would
        # wait for it forever, as a future cancelled that way is never marked notified.
        pending = self._pending
        if pending is not None and not pending.cancel():
            pending.exception()  # running or finished: wait until it is done

    def _chunks(self) -> Iterator[tuple[np.ndarray, memoryview]]:
        turn, offset = 0, 0
        batch = self._submit(turn)
        while self._pending is not None and (n := self._pending.result()):
            current = self._buffers[turn][:n]
            blocks = _blocks_of(batch, n) if batch is not None else blocks_at(offset, n)
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
        target = buffer[filled : filled + length]
        if isinstance(stream, RangeReadable):
            n = stream.pread_into(target, offset)
        else:
            n = pread_into(stream, target, offset)
        filled += n
        if n < length:
            break
    return filled


def _blocks_of(batch: list[tuple[int, int]], n: int) -> np.ndarray:
    """Block numbers of the pages of the first ``n`` bytes gathered from ``batch``."""
    blocks = np.concatenate([blocks_at(offset, length) for offset, length in batch])
    return blocks[: -(-n // PAGE_SIZE)]
