"""Files assembled from several layers (a chain of deltas): which writes make one, the pages
each layer's frame writes, and the check of the assembled file made while it is written."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from drkit.errors import IntegrityError
from drkit.fsutil import start_writeback, write_at
from drkit.pg.constants import PAGE_SIZE
from drkit.progress import Progress
from drkit.repo.chain import FilePlan, Layer
from drkit.repo.layers import SECTION_PAGES
from drkit.restore.paths import TargetTree

if TYPE_CHECKING:
    import numpy as np


class Assembly:
    """The check of one file assembled from layers, made while it is written: each write still
    to come (a layer, or a chunk of one) has a lowest block it may write, so every byte below
    all of them is final. Whenever that frontier moves, the worker that moved it reads the new
    final bytes back (from the page cache, just written), hashes them in order and starts their
    writeback, while the other workers go on; when the last write is in, the digest is compared
    with the manifest's. A big file thus needs no read-back after its last write but its tail.
    (A delta from WAL summaries has no whole-file checksum: its bytes are only written back.)"""

    def __init__(self, plan: FilePlan, writes: dict[Hashable, int]) -> None:
        self.plan = plan
        self.checked = False
        self._pending = dict(writes)  # the lowest byte each write still to come may touch
        self._digest = hashlib.sha256() if plan.entry.sha256 is not None else None
        self._final = 0  # bytes read back (and hashed) so far
        self._busy = False  # a worker is reading back
        self._lock = threading.Lock()

    def written(self, write: Hashable, tree: TargetTree) -> None:
        with self._lock:
            del self._pending[write]
            if self._busy:
                return  # the worker reading back sees the new frontier when it looks again
            self._busy = True
        while True:
            with self._lock:
                frontier = min(self._pending.values(), default=self.plan.entry.size)
                if frontier <= self._final:
                    self._busy = False
                    complete = not self._pending and not self.checked
                    self.checked = self.checked or complete
                    break
            self._read_back(tree, self._final, frontier)
            self._final = frontier
        digest = self._digest
        if complete and digest is not None and digest.hexdigest() != self.plan.entry.sha256:
            owners = ", ".join(each.owner for each in self.plan.layers)
            raise IntegrityError(
                f"'{self.plan.entry.path}' assembled from backups {owners} does not match its"
                " checksum"
            )

    def _read_back(self, tree: TargetTree, start: int, end: int) -> None:
        with open(tree.open(self.plan.entry.path, os.O_RDONLY), "rb", buffering=0) as f:
            if self._digest is not None:
                buffer = memoryview(bytearray(min(end - start, 4 * 1024 * 1024)))
                position = start
                while position < end:
                    n = os.preadv(f.fileno(), [buffer[: end - position]], position)
                    if n == 0:
                        raise IntegrityError(f"'{self.plan.entry.path}' is shorter than planned")
                    self._digest.update(buffer[:n])
                    position += n
            start_writeback(f.fileno(), start, end - start)  # final: on its way to disk


def assembly_writes(plan: FilePlan) -> dict[Hashable, int]:
    """The writes an assembled file is made of, each with the lowest byte it may touch: its
    sections, or its layers (a chunked whole layer, chunk by chunk)."""
    if in_sections(plan):
        return {(None, first): first * PAGE_SIZE for first, _ in sections(plan)}
    return {
        (id(layer), chunk): _lowest_byte(layer, chunk, plan.entry.size)
        for layer in plan.layers
        for chunk in (range(len(layer.entry.chunks or [])) if by_chunk(layer) else [None])
    }


def _lowest_byte(layer: Layer, chunk: int | None, size: int) -> int:
    """The lowest byte of the file that a layer (or chunk ``chunk`` of it) may write."""
    assert layer.mask is not None  # every layer of an assembled file has one
    if chunk is None:
        selected = layer.mask.nonzero()[0]
        return int(selected[0]) * PAGE_SIZE if selected.size else size
    chunks = layer.entry.chunks or []
    end = chunks[chunk + 1][0] if chunk + 1 < len(chunks) else layer.entry.payload_size
    spans = layer.spans(chunks[chunk][0] // PAGE_SIZE, block_count(end))
    return min(start for start, _ in spans) * PAGE_SIZE if spans else size


def in_sections(plan: FilePlan) -> bool:
    """Whether an assembled file is written in sections: some layer holds XOR deltas (applied
    to the older layers' pages in memory). Others are written layer by layer, each page where it
    lies, as their objects (or chunks) are read: measured faster for plain layers."""
    return plan.entry.size > 0 and any(layer.entry.xor for layer in plan.layers)


def sections(plan: FilePlan) -> list[tuple[int, int]]:
    blocks = block_count(plan.entry.size)
    return [(low, min(low + SECTION_PAGES, blocks)) for low in range(0, blocks, SECTION_PAGES)]


class PageWriter:
    """Writes the pages of one layer's frame that the layer's mask selects (the newest layer that
    has a page writes it), one pwrite per run of pages consecutive both in the frame and in the
    file. ``spans`` are the block ranges the frame holds, in frame order; its plaintext arrives
    in pieces of any size, which may cut a run anywhere."""

    def __init__(
        self, fd: int, layer: Layer, spans: list[tuple[int, int]], progress: Progress
    ) -> None:
        assert layer.mask is not None  # every layer of an assembled file has one
        self._fd = fd
        self._runs = _selected_runs(layer.mask, spans)
        self._offset = 0  # of the next piece in the frame's plaintext
        self._progress = progress

    def feed(self, piece: bytes | memoryview) -> None:
        view, start, end = memoryview(piece), self._offset, self._offset + len(piece)
        while self._runs:
            first_page, block, count = self._runs[0]
            run_start, run_end = first_page * PAGE_SIZE, (first_page + count) * PAGE_SIZE
            if run_start >= end:
                break
            a, b = max(run_start, start), min(run_end, end)
            data, offset = view[a - start : b - start], block * PAGE_SIZE + a - run_start
            self._progress.advance(len(data))
            write_at(self._fd, data, offset)
            if b < run_end:
                break  # the rest of this run comes with the next piece
            self._runs.popleft()
        self._offset = end


def _selected_runs(mask: np.ndarray, spans: list[tuple[int, int]]) -> deque[tuple[int, int, int]]:
    """(first page in the frame, first block in the file, pages) of each run of selected pages
    that is consecutive in the frame and in the file."""
    import numpy as np  # only files assembled from a chain get here

    starts = np.array([a for a, _ in spans], dtype=np.int64)
    lengths = np.array([b - a for a, b in spans], dtype=np.int64)
    frame_starts = np.cumsum(lengths) - lengths
    # the block of every page of the frame
    blocks = np.repeat(starts - frame_starts, lengths) + np.arange(int(lengths.sum()))
    selected = np.zeros(len(blocks), dtype=bool)
    inside = blocks < len(mask)  # pages past the newest size are not restored
    selected[inside] = mask[blocks[inside]]
    pages = np.flatnonzero(selected)
    if not pages.size:
        return deque()
    breaks = np.flatnonzero((np.diff(pages) != 1) | (np.diff(blocks[pages]) != 1))
    first = pages[np.concatenate(([0], breaks + 1))]
    last = pages[np.concatenate((breaks, [len(pages) - 1]))]
    return deque(
        zip(first.tolist(), blocks[first].tolist(), (last - first + 1).tolist(), strict=True)
    )


def by_chunk(layer: Layer) -> bool:
    """Whether a layer is restored chunk by chunk, in parallel: a large whole frame. (A large
    delta's chunks are decoded in one go: its pages are scattered over the file, and writing them
    from one thread measured faster than from all.)"""
    return bool(layer.entry.chunks) and layer.entry.pages is None


def block_count(size: int) -> int:
    return -(-size // PAGE_SIZE)
