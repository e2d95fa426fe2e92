"""The backup pipeline: read -> page check -> checksum -> zstd -> AEAD frame -> store, in parallel.

Sources are grouped into objects: a file of ``bundle_limit`` bytes or more is an object of its
own, smaller files are bundled (in path order) into objects of about ``bundle_size`` bytes, each
file an independently decodable frame inside its bundle, so one file restores with one ranged read.
Worker threads each build one object at a time, streaming: memory per worker is one read buffer
plus the codec's segment buffers, whatever the file sizes. zstd, sha256, AES-GCM and numpy all
release the GIL, which is why threads (not processes) scale here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from drkit.codec.frame import FrameWriter
from drkit.config.settings import BackupSettings
from drkit.pg.pages import PAGE_SIZE, RELSEG_PAGES, check_pages
from drkit.progress import Progress
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.repository import Repository, file_context

READ_CHUNK = 1024 * 1024  # a multiple of the page size, so page checks see whole pages


@dataclass(frozen=True)
class Source:
    """Something to store as one file of the backup."""

    path: str  # PGDATA-relative path it restores to
    size: int  # expected size, for planning; the bytes actually read are recorded
    mode: int
    mtime: float
    open: Callable[[], BinaryIO]
    page_check_segment: int | None = None  # relation segment number, when pages are verified
    required: bool = False  # a required source that vanished fails the backup


@dataclass
class CopyResult:
    files: list[FileEntry] = field(default_factory=list)
    objects: list[ObjectEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_objects(sources: Iterable[Source], bundle_limit: int, bundle_size: int) -> list[list[Source]]:
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
    ) -> None:
        self._repo = repo
        self._label = label
        self._dek = dek
        self._settings = settings
        self._progress = progress
        self._page_check_lsn = page_check_lsn
        self._next_index = 0
        self._lock = threading.Lock()

    def copy(self, sources: list[Source]) -> CopyResult:
        groups = plan_objects(sources, self._settings.bundle_limit, self._settings.bundle_size)
        result = CopyResult()
        with ThreadPoolExecutor(self._settings.process_max, thread_name_prefix="backup") as pool:
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
        result = CopyResult()
        key = self._object_key()
        offset = 0
        with self._repo.storage.open_write(key) as writer:
            for src in group:
                try:
                    stream = src.open()
                except FileNotFoundError:
                    if src.required:
                        raise
                    continue  # dropped while we ran (a dropped table); WAL replay agrees
                with stream:
                    entry, warnings = self._store_file(src, stream, writer.write, key, offset)
                result.files.append(entry)
                result.warnings += warnings
                offset += entry.length
            written = writer.commit()
        result.objects.append(ObjectEntry(key=key, size=written.size, sha256=written.sha256))
        return result

    def _store_file(
        self,
        src: Source,
        stream: BinaryIO,
        sink: Callable[[bytes], object],
        key: str,
        offset: int,
    ) -> tuple[FileEntry, list[str]]:
        frame = FrameWriter(
            sink,
            self._dek,
            file_context(str(self._label), src.path),
            compress_level=self._settings.compress_level,
            segment_size=self._settings.segment_size,
        )
        check = src.page_check_segment is not None and self._page_check_lsn is not None
        first_block = (src.page_check_segment or 0) * RELSEG_PAGES
        bad_pages: list[int] = []
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        position = 0
        while True:
            n = stream.readinto(buffer)
            if not n:
                break
            chunk = view[:n]
            if check:
                bad_pages += self._check_pages(stream, chunk, first_block + position // PAGE_SIZE)
            frame.write(chunk)
            position += n
            self._progress.advance(n)
        info = frame.close()
        warnings = [
            f"page checksum failure in '{src.path}' block {block}"
            for block in bad_pages
        ]
        entry = FileEntry(
            path=src.path,
            size=info.plain_size,
            mode=src.mode,
            mtime=src.mtime,
            sha256=info.plain_sha256,
            object=key,
            offset=offset,
            length=info.stored_size,
            bad_pages=bad_pages,
        )
        return entry, warnings

    def _check_pages(self, stream: BinaryIO, chunk: memoryview, first_block: int) -> list[int]:
        assert self._page_check_lsn is not None
        failures = check_pages(chunk, first_block, self._page_check_lsn)
        bad: list[int] = []
        for failure in failures:
            # A page being written while we read it can look torn: read it once more.
            in_file = (failure.block % RELSEG_PAGES) * PAGE_SIZE
            again = os.pread(stream.fileno(), PAGE_SIZE, in_file)
            if not check_pages(again, failure.block, self._page_check_lsn):
                continue
            bad.append(failure.block % RELSEG_PAGES)
        return bad
