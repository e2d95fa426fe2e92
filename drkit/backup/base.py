"""The base backup's version of the pages a diff/incr stores as XOR deltas.

A pgbench-like update changes a few bytes of a page (a tuple's xmax and flags, the page LSN and
checksum) or adds one tuple to it: the page XORed with its previous version is nearly all zeros
and compresses to a few hundred bytes instead of a few KiB. The previous version is rebuilt from
the base backup's chain in the repository, a block range at a time (repo/layers.py), and every
chunk decoded for it is checked against its checksum.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from drkit.errors import DrkitError, IntegrityError
from drkit.pg.constants import PAGE_SIZE
from drkit.repo.chain import Chain, FilePlan
from drkit.repo.label import BackupLabel
from drkit.repo.layers import LayerCursor, LayerReader
from drkit.repo.repository import Repository

if TYPE_CHECKING:
    import numpy as np


class BaseVersions:
    """Pages of the base backup's files, rebuilt from its chain, for files read in block order."""

    def __init__(self, repo: Repository, label: str) -> None:
        self.label = label
        self._chain = Chain.load(repo, BackupLabel(label))
        self._reader = LayerReader(repo, self._chain.deks)
        self._local = threading.local()  # per worker: the file it reads, its plan and cursors

    def pages(self, path: str, blocks: np.ndarray) -> np.ndarray:
        """The base's version of blocks ``blocks`` of ``path``, one row each (zeros past the
        base's end); calls for one file must come in block order."""
        import numpy as np

        plan, cursors = self._file(path)
        out = np.zeros((len(blocks), PAGE_SIZE), dtype=np.uint8)
        inside = blocks < -(-plan.entry.size // PAGE_SIZE)
        if inside.any():
            held = blocks[inside]
            low, high = int(held[0]), int(held[-1]) + 1
            window = np.zeros((high - low, PAGE_SIZE), dtype=np.uint8)
            with self._naming(path):
                for cursor in cursors:
                    cursor.fill(window, low, high)
            out[inside] = window[held - low]
        return out

    def finish(self, path: str) -> None:
        """``path`` is read: decode the rest of the chunks walked, so their checks run."""
        if getattr(self._local, "path", None) == path:
            with self._naming(path):
                for cursor in self._local.cursors:
                    cursor.finish()
            self._local.path = None

    @contextmanager
    def _naming(self, path: str) -> Iterator[None]:
        try:
            yield
        except DrkitError as exc:
            raise IntegrityError(
                f"cannot rebuild the parent's version of '{path}' from backup '{self.label}':"
                f" {exc.message}",
                hint="the parent backup is damaged: run 'drkit verify', and take a full backup"
                " (drkit backup --type full)",
            ) from None

    def _file(self, path: str) -> tuple[FilePlan, list[LayerCursor]]:
        if getattr(self._local, "path", None) != path:
            plan = self._chain.plan_file(path)
            assert plan is not None  # a delta's file is in its base backup
            self._local.path, self._local.plan = path, plan
            self._local.cursors = [LayerCursor(layer, self._reader) for layer in plan.layers]
        return self._local.plan, self._local.cursors
