"""A backup chain (full -> diff -> incr ...) and, per file, the layers that rebuild it.

For every file the newest backup's entry decides size and checksum. Its bytes come in *layers*,
newest first: the entry's own frame (whole or delta), then, for a delta, the same path in the
backup it is based on, and so on until a whole frame. Each page is taken from the newest layer
that stores it plainly, so the masks of plain layers are disjoint: every page is written once and
the frames of different backups can be restored in parallel, in any order. A layer of XOR deltas
(``FileEntry.xor``) stores differences from its base's version of each page: its pages stay for
the older layers to lay too (the two are XORed), except past its base's end, where the base's
version is zeros. Used by restore, and by a backup storing XOR deltas (its parent's version).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from drkit.errors import BackupNotFound, IntegrityError
from drkit.pg.constants import PAGE_SIZE
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, Manifest
from drkit.repo.repository import Repository

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Layer:
    owner: str  # backup whose key and context decode the frame
    entry: FileEntry  # the frame's location and kind (whole or delta)
    mask: np.ndarray | None  # bool per block of the file: the pages this layer writes (None: all)

    def spans(self, first: int, end: int) -> list[tuple[int, int]]:
        """The block ranges of the file that pages [first, end) of the frame hold, in frame
        order (a whole frame holds the file's blocks in order; a delta, its ``pages`` ranges)."""
        ranges, starts = self._ranges, self._frame_starts
        found: list[tuple[int, int]] = []
        for i in range(max(bisect_right(starts, first) - 1, 0), len(ranges)):
            (start, stop), position = ranges[i], starts[i]
            if position >= end:
                break
            low, high = max(first, position), min(end, position + stop - start)
            if low < high:
                found.append((start + low - position, start + high - position))
        return found

    @cached_property
    def frame_blocks(self) -> np.ndarray:
        """The block of the file that each page of the frame holds, in frame order."""
        import numpy as np

        starts = np.array([a for a, _ in self._ranges], dtype=np.int64)
        lengths = np.array([b - a for a, b in self._ranges], dtype=np.int64)
        blocks = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        blocks += np.arange(len(blocks), dtype=np.int64)
        if np.any(np.diff(blocks) <= 0):
            raise IntegrityError(f"the pages of '{self.entry.path}' in backup '{self.owner}'"
                                 " are not in block order")  # fmt: skip
        return blocks

    @cached_property
    def _ranges(self) -> list[tuple[int, int]]:
        """The block ranges the frame holds, in frame order."""
        if self.entry.pages is not None:
            return self.entry.pages  # a delta (perhaps of no page at all)
        return [(0, _blocks(self.entry.size))]

    @cached_property
    def _frame_starts(self) -> list[int]:
        """The frame page at which each block range of the frame starts."""
        starts, position = [], 0
        for start, stop in self._ranges:
            starts.append(position)
            position += stop - start
        return starts


@dataclass
class FilePlan:
    entry: FileEntry  # the newest entry: size, mode, mtime, sha256 of the restored file
    layers: list[Layer] = field(default_factory=list)

    @property
    def simple(self) -> bool:
        """One whole frame: written sequentially and checked as it streams."""
        return len(self.layers) == 1 and self.layers[0].entry.pages is None


@dataclass
class Chain:
    """The manifests and data keys of a backup and every backup it depends on."""

    target: Manifest
    manifests: dict[str, Manifest]
    deks: dict[str, bytes]

    @classmethod
    def load(cls, repo: Repository, label: BackupLabel) -> Chain:
        target, dek = repo.load_manifest(label)
        manifests, deks = {target.label: target}, {target.label: dek}
        available = {str(b) for b in repo.backups()}
        for member in target.chain[:-1] if target.chain else []:
            if member not in available:
                raise BackupNotFound(
                    f"backup '{target.label}' depends on backup '{member}', which is missing"
                    f" from repository '{repo.name}'",
                    hint="restore an older complete backup, or a copy from another repository",
                )
            manifests[member], deks[member] = repo.load_manifest(BackupLabel(member))
        return cls(target, manifests, deks)

    def plan(self) -> list[FilePlan]:
        return [self._plan_file(entry) for entry in self.target.files]

    def plan_file(self, path: str) -> FilePlan | None:
        """The plan of one file of the target backup (None: the backup has no such file)."""
        entry = self._by_path[self.target.label].get(path)
        return None if entry is None else self._plan_file(entry)

    @cached_property
    def _by_path(self) -> dict[str, dict[str, FileEntry]]:
        return {label: {f.path: f for f in m.files} for label, m in self.manifests.items()}

    def _plan_file(self, entry: FileEntry) -> FilePlan:
        if entry.pages is None:  # one whole frame holds it all: no masks (and no numpy)
            return FilePlan(entry, [Layer(entry.backup or self.target.label, entry, None)])
        import numpy as np  # only files assembled from a chain need masks

        by_path = self._by_path
        plan = FilePlan(entry)

        nblocks = _blocks(entry.size)
        covered = np.zeros(nblocks, dtype=bool)
        current, holder = entry, self.target.label
        while True:
            layer = Layer(current.owner(holder), current, None)
            mask = np.zeros(nblocks, dtype=bool)
            if current.pages is None:
                mask[: min(nblocks, _blocks(current.size))] = True
            else:
                blocks = layer.frame_blocks
                mask[blocks[blocks < nblocks]] = True
            mask &= ~covered
            if not current.xor:
                covered |= mask
            layer.mask = mask
            plan.layers.append(layer)
            if current.pages is None or covered.all():
                break
            base = current.base
            if base is None or base not in by_path or entry.path not in by_path[base]:
                raise IntegrityError(
                    f"'{entry.path}' in backup '{self.target.label}' needs its older version"
                    f" from backup '{base}', which does not have it"
                )
            older = by_path[base][entry.path]
            if current.xor:
                # Its pages are differences from the older version (zeros past its end): the
                # older layers still lay the pages they apply to
                covered[_blocks(older.size) :] |= mask[_blocks(older.size) :]
                if covered.all():
                    break
            current, holder = older, base
        if not covered.all():
            raise IntegrityError(f"the backup chain does not hold every page of '{entry.path}'")
        return plan


def _blocks(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE
