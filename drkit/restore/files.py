"""Write the files of a restore plan: every object read once, every page written once.

Files restored from one whole frame are written sequentially and checked as they stream. Files
assembled from several layers (a chain of deltas) are created at their final size first, each
layer writes its pages with pwrite, and the file is read back and hashed as its bytes become
final, the checksum compared with the manifest's once every layer is in: the restored file is
proven, not just its pieces. A file with a layer of XOR deltas is written in sections instead,
window by window, every layer's pages XORed into one buffer (repo/layers.py), then written.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from functools import partial
from typing import TYPE_CHECKING

from drkit.errors import (
    CopyFallback,
    DrkitError,
    DrkitWarning,
    IntegrityError,
    RestoreTargetError,
)
from drkit.fsutil import WRITE_PIECE, start_writeback, write_at, write_direct
from drkit.pg.constants import PAGE_SIZE
from drkit.pg.layout import restored_mode
from drkit.pools import worker_pool
from drkit.progress import Progress
from drkit.repo.chain import Chain, FilePlan, Layer
from drkit.repo.layers import LayerPages, LayerReader
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.reader import read_object
from drkit.repo.repository import Repository
from drkit.restore.assembly import (
    Assembly,
    PageWriter,
    assembly_writes,
    block_count,
    by_chunk,
    in_sections,
    sections,
)
from drkit.restore.paths import TargetTree, finish_open

if TYPE_CHECKING:
    pass

# A file with XOR layers is written in sections of SECTION_PAGES blocks (one task each), each in
# windows of WINDOW_PAGES blocks (one buffer, then written)
WINDOW_PAGES = 1024  # 8 MiB

# Tasks run largest first, by bytes to write plus this much per file: creating a file costs about
# what writing 128 KiB does, so an object bundling a thousand small files is started early, not
# left to run alone at the end
FILE_WEIGHT = 128 * 1024


class FileWriter:
    """Restores files from the first repository, falling back per object to the next copy when
    an object is missing, unreadable or fails its checksums there. Every file is opened in
    ``tree``, never by a path from the target's root (restore/paths.py)."""

    def __init__(
        self,
        repos: list[Repository],
        chain: Chain,
        tree: TargetTree,
        progress: Progress,
        direct: bool = True,
    ) -> None:
        """``direct``: write the chunks of large files with O_DIRECT (see _write_chunks)."""
        self._repos = repos
        self._direct = direct
        self._chain = chain
        self._tree = tree
        self._progress = progress
        self.warnings: list[DrkitWarning] = []  # objects read from another copy, and why
        self._lock = threading.Lock()
        # Files assembled from a chain, checked as they become final (see Assembly)
        self._assemblies: dict[str, Assembly] = {}
        self._readers = {repo.name: LayerReader(repo, chain.deks) for repo in repos}

    def write(
        self, plans: list[FilePlan], workers: int, in_place: dict[str, set[int]] | None = None
    ) -> None:
        """Write ``plans``' files, new; those named in ``in_place`` (large files stored in
        chunks, kept by a delta restore) are resized and get only the chunks listed there."""
        # Which layers each (backup, object) feeds, so each object is read exactly once; a large
        # file stored in chunks is restored by runs of chunks, in parallel, instead: a chunk
        # each from a local store, ``workers`` runs of it from a remote one (see _runs)
        runs = workers if self._repos[0].storage.capabilities.remote else None
        work: dict[tuple[str, str], dict[str, tuple[FilePlan, Layer]]] = {}
        tasks: list[tuple[int, Callable[[], None]]] = []
        for plan in plans:
            only = (in_place or {}).get(plan.entry.path)
            if plan.simple and plan.layers[0].entry.chunks and only is None:
                self._create(plan.entry)
            elif plan.simple and plan.layers[0].entry.chunks:
                self._resize(plan.entry)
            if in_sections(plan):
                tasks += self._section_tasks(plan)
                continue
            for layer in plan.layers:
                if by_chunk(layer):
                    tasks += self._chunk_tasks(plan, layer, only, runs)
                else:
                    key = (layer.owner, layer.entry.object)
                    work.setdefault(key, {})[plan.entry.path] = (plan, layer)
        for key, layers in work.items():
            weight = self._object(*key).size + len(layers) * FILE_WEIGHT
            tasks.append((weight, partial(self._restore_object, key, layers)))
        for plan in plans:
            if not plan.simple:
                self._create(plan.entry)
                self._assemblies[plan.entry.path] = Assembly(plan, assembly_writes(plan))

        # Writing with O_DIRECT, a worker waits for the disk after each chunk: one worker more
        # keeps the cores decoding meanwhile
        with worker_pool(workers + self._direct, "restore") as pool:
            tasks.sort(key=lambda task: -task[0])
            list(pool.map(lambda task: task[1](), tasks))
        if unchecked := [path for path, done in self._assemblies.items() if not done.checked]:
            raise IntegrityError(f"'{unchecked[0]}' was not completely restored")  # never expected
        for plan in plans:
            if not _written_whole(plan):  # those got their mode and mtime as they were written
                self._tree.finish_file(plan.entry.path, plan.entry.mode, plan.entry.mtime)

    def _object(self, owner: str, key: str) -> ObjectEntry:
        for obj in self._chain.manifests[owner].objects:
            if obj.key == key:
                return obj
        raise IntegrityError(f"backup '{owner}' does not list object '{key}'")

    def _from_any_copy(
        self, what: str, attempt: Callable[[Repository], None], undo: Callable[[], None]
    ) -> None:
        """Run ``attempt`` against each repository in turn until one serves it intact."""
        first_error: DrkitError | None = None
        for repo in self._repos:
            try:
                attempt(repo)
            except DrkitError as exc:
                first_error = first_error or exc
                undo()
                with self._lock:
                    self.warnings.append(CopyFallback(f"{what} unusable in '{repo.name}': {exc}"))
                continue
            if first_error is not None:
                with self._lock:
                    self.warnings.append(CopyFallback(f"{what} restored from '{repo.name}'"))
            return
        assert first_error is not None
        raise first_error

    def _restore_object(
        self, key: tuple[str, str], layers: dict[str, tuple[FilePlan, Layer]]
    ) -> None:
        self._from_any_copy(
            f"object '{key[1]}'",
            lambda repo: self._restore_object_from(repo, key, layers),
            lambda: self._undo(layers),
        )
        for plan, layer in layers.values():
            self._written(plan, (id(layer), None))

    def _written(self, plan: FilePlan, write: Hashable) -> None:
        """A write of ``plan`` (see assembly_writes) is in: check what became final."""
        if not plan.simple:
            self._assemblies[plan.entry.path].written(write, self._tree)

    def _chunk_tasks(
        self, plan: FilePlan, layer: Layer, only: set[int] | None, runs: int | None
    ) -> list[tuple[int, Callable[[], None]]]:
        chunks = layer.entry.chunks or []
        ends = [c[0] for c in chunks[1:]] + [layer.entry.payload_size]
        sizes = [end - chunk[0] for chunk, end in zip(chunks, ends, strict=True)]
        wanted = [index for index in range(len(chunks)) if only is None or index in only]
        return [
            (sum(sizes[index] for index in run), partial(self._restore_run, plan, layer, run))
            for run in _runs(wanted, sizes, runs)
        ]

    def _restore_run(self, plan: FilePlan, layer: Layer, run: list[int]) -> None:
        """Restore chunks ``run`` (consecutive) of ``layer``: read as one range, each chunk
        written as it decodes; from the next copy, the chunks not yet written."""
        left = deque(run)
        chunks = f"chunk {run[0]}" if len(run) == 1 else f"chunks {run[0]}-{run[-1]}"
        self._from_any_copy(
            f"{chunks} of '{plan.entry.path}' (object '{layer.entry.object}')",
            lambda repo: self._write_chunks(repo, plan, layer, left),
            lambda: None,  # a chunk is written in place again from the next copy
        )
        for index in run:
            self._written(plan, (id(layer), index))

    def _write_chunks(
        self, repo: Repository, plan: FilePlan, layer: Layer, left: deque[int]
    ) -> None:
        """Decode chunks ``left`` (consecutive) of a large file's frame in one pass and write
        each at its offset (only the pages its layer's mask selects, in a file assembled from a
        chain), checked; each is taken off ``left`` once written and checked."""
        entry = layer.entry
        chunks = entry.chunks or []
        decoded = self._readers[repo.name].chunk_plaintext(
            layer, left[0], left[-1] + 1, hashing=not _checked_whole(plan), reuse=plan.simple
        )
        fd = self._tree.open(plan.entry.path, os.O_WRONLY)
        try:
            for index, pieces in decoded:
                start = chunks[index][0]
                end = chunks[index + 1][0] if index + 1 < len(chunks) else entry.payload_size
                if plan.simple:
                    self._write_chunk(fd, pieces, start)
                else:
                    spans = layer.spans(start // PAGE_SIZE, block_count(end))
                    pages = PageWriter(fd, layer, spans, self._progress)
                    for piece in pieces:
                        pages.feed(piece)
                left.popleft()
        except DrkitError as exc:
            chunk = f" (chunk {left[0]})" if left else ""
            raise type(exc)(
                f"unable to restore '{plan.entry.path}'{chunk} from backup"
                f" '{layer.owner}': {exc.message}",
                hint=exc.hint or "run 'drkit verify' to list every damaged file",
            ) from None
        finally:
            decoded.close()
            os.close(fd)

    def _write_chunk(self, fd: int, pieces: Iterator[bytes | memoryview], start: int) -> None:
        """Write a chunk of a file restored whole, from byte ``start`` on. With ``direct``, a
        chunk decoded whole into a page-aligned buffer goes to the disk with O_DIRECT, which
        spares the kernel's copy into the page cache and its writeback (a restored cluster
        reads back little of it); what O_DIRECT cannot take goes through the page cache, its
        writeback started at once."""
        position, cached = start, None  # cached: where the bytes written through the cache begin
        for piece in pieces:
            view = memoryview(piece)
            if self._direct:
                through_cache = write_direct(fd, view, position)
            else:
                write_at(fd, view, position)
                through_cache = len(view)
            if through_cache and cached is None:
                cached = position + len(view) - through_cache
            position += len(view)
            self._progress.advance(len(view))
        if cached is not None:
            start_writeback(fd, cached, position - cached)

    def _section_tasks(self, plan: FilePlan) -> list[tuple[int, Callable[[], None]]]:
        return [
            ((end - first) * PAGE_SIZE, partial(self._restore_section, plan, first, end))
            for first, end in sections(plan)
        ]

    def _restore_section(self, plan: FilePlan, first: int, end: int) -> None:
        objects = ", ".join(sorted({f"'{layer.entry.object}'" for layer in plan.layers}))
        self._from_any_copy(
            f"blocks {first}-{end - 1} of '{plan.entry.path}' (objects {objects})",
            lambda repo: self._write_section(repo, plan, first, end),
            lambda: None,  # a section is written in place again from the next copy
        )
        self._written(plan, (None, first))

    def _write_section(self, repo: Repository, plan: FilePlan, first: int, end: int) -> None:
        """Write blocks [first, end) of an assembled file window by window: every layer's pages
        of the window XORed into one zeroed buffer (see layers.py), then written, and its
        writeback started at once (a window is final as written; waiting for the read-back, in
        file order, left more for the final sync: a 5-member chain restored 0.08 s slower)."""
        import numpy as np  # only files assembled from a chain get here

        reader, hashing = self._readers[repo.name], not _checked_whole(plan)
        feeds = [LayerPages(layer, first, end, reader, hashing) for layer in plan.layers]
        window = np.empty((min(WINDOW_PAGES, end - first), PAGE_SIZE), dtype=np.uint8)
        fd = self._tree.open(plan.entry.path, os.O_WRONLY)
        try:
            for low in range(first, end, WINDOW_PAGES):
                high = min(low + WINDOW_PAGES, end)
                window[: high - low] = 0
                for feed in feeds:
                    feed.fill(window, low, high)
                offset = low * PAGE_SIZE
                size = min(high * PAGE_SIZE, plan.entry.size) - offset
                write_at(fd, window.reshape(-1).data[:size], offset)
                start_writeback(fd, offset, size)
                self._progress.advance(size)
            for feed in feeds:
                feed.finish()
        finally:
            os.close(fd)

    def _undo(self, layers: dict[str, tuple[FilePlan, Layer]]) -> None:
        """Forget a failed attempt: files written whole are created again from the next copy
        (pages of assembled files are simply written again)."""
        for plan, _ in layers.values():
            if plan.simple:
                self._tree.unlink(plan.entry.path)

    def _restore_object_from(
        self, repo: Repository, key: tuple[str, str], layers: dict[str, tuple[FilePlan, Layer]]
    ) -> None:
        owner, object_key = key

        def consume(entry: FileEntry, chunks: Iterator[bytes]) -> None:
            plan, layer = layers[entry.path]
            if plan.simple:
                self._write_whole(plan.entry, chunks)
            else:
                self._write_pages(plan.entry, layer, chunks)

        outcomes = read_object(
            repo,
            self._object(owner, object_key),
            [layer.entry for _, layer in layers.values()],
            self._chain.deks[owner],
            owner,
            consume,
            check_object=False,
            checked_later=[path for path, (plan, _) in layers.items() if _checked_whole(plan)],
        )
        for outcome in outcomes:
            if outcome.error is not None:
                raise IntegrityError(
                    f"unable to restore '{outcome.entry.path}' from backup '{owner}':"
                    f" {outcome.error}",
                    hint="run 'drkit verify' to list every damaged file",
                )

    def _create(self, entry: FileEntry) -> None:
        fd = self._tree.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)

    def _resize(self, entry: FileEntry) -> None:
        """Give a file kept in place its restored size (a plain file with one link: anything
        else was removed and is written anew, restore/delta.py)."""
        fd = self._tree.open(entry.path, os.O_WRONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise RestoreTargetError(
                    f"'{entry.path}' changed while it was restored: it is no longer a plain file",
                    hint="make sure nothing else writes into the directory, then run the restore"
                    " again",
                )
            os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)

    def _write_whole(self, entry: FileEntry, chunks: Iterator[bytes]) -> None:
        mode = restored_mode(entry.mode, False)
        fd = self._tree.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            position = 0
            for chunk in chunks:
                write_at(fd, chunk, position)
                position += len(chunk)
                self._progress.advance(len(chunk))
            if entry.size >= WRITE_PIECE:  # small files: the final sync writes them just as well
                start_writeback(fd, 0, entry.size)
            finish_open(fd, entry.mode, entry.mtime, mode)  # no second open for these
        finally:
            os.close(fd)

    def _write_pages(self, entry: FileEntry, layer: Layer, chunks: Iterator[bytes]) -> None:
        """Write the pages of ``layer``'s frame that its mask selects, at their block offsets."""
        fd = self._tree.open(entry.path, os.O_WRONLY)
        try:
            spans = layer.spans(0, block_count(layer.entry.payload_size))
            pages = PageWriter(fd, layer, spans, self._progress)
            for chunk in chunks:
                pages.feed(chunk)
        finally:
            os.close(fd)


def _written_whole(plan: FilePlan) -> bool:
    """Whether the file is written by _write_whole, in one go from its one frame."""
    return plan.simple and not plan.layers[0].entry.chunks


def _checked_whole(plan: FilePlan) -> bool:
    """Whether the file is read back and checked whole once assembled, so its layers' plaintext
    need not be hashed as they decode. (Not a delta from WAL summaries: no whole-file checksum.)"""
    return not plan.simple and plan.entry.sha256 is not None


def _runs(wanted: list[int], sizes: list[int], count: int | None) -> list[list[int]]:
    """Chunks ``wanted`` (ascending) as runs of consecutive chunks, each restored by one task
    reading it as one range: from a remote store about ``count`` runs of equal bytes (a
    request each; S3 charges by the request, and a store that reads a whole object for each
    ranged GET is read ``count`` times, not once per chunk), else a chunk each (a local read
    costs no request, and small tasks keep the workers evenly busy to the end)."""
    if count is None:
        return [[index] for index in wanted]
    target = -(-sum(sizes[index] for index in wanted) // count)
    runs: list[list[int]] = []
    filled = 0
    for index in wanted:
        if not runs or runs[-1][-1] != index - 1 or filled >= target:
            runs.append([])
            filled = 0
        runs[-1].append(index)
        filled += sizes[index]
    return runs
