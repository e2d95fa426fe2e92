"""Write the files of a restore plan: every object read once, every page written once.

Files restored from one whole frame are written sequentially and checked as they stream. Files
assembled from several layers (a chain of deltas) are created at their final size first, each
layer writes its pages with pwrite, and once every layer is in, the file is read back and its
checksum compared with the manifest: the restored file is proven, not just its pieces.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from drkit.errors import DrkitError, IntegrityError
from drkit.pg.pages import PAGE_SIZE
from drkit.progress import Progress
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.reader import read_object
from drkit.repo.repository import Repository
from drkit.restore.plan import Chain, FilePlan, Layer


class FileWriter:
    """Restores files from the first repository, falling back per object to the next copy when
    an object is missing, unreadable or fails its checksums there."""

    def __init__(
        self, repos: list[Repository], chain: Chain, pgdata: Path, progress: Progress
    ) -> None:
        self._repos = repos
        self._chain = chain
        self._pgdata = pgdata
        self._progress = progress
        self.events: list[str] = []
        self._lock = threading.Lock()

    def write(self, plans: list[FilePlan], workers: int) -> None:
        # Which layers each (backup, object) feeds, so each object is read exactly once
        work: dict[tuple[str, str], dict[str, tuple[FilePlan, Layer]]] = {}
        for plan in plans:
            for layer in plan.layers:
                key = (layer.owner, layer.entry.object)
                work.setdefault(key, {})[plan.entry.path] = (plan, layer)
        assembled = [p for p in plans if not p.simple]
        for plan in assembled:
            self._create(plan.entry)

        with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
            groups = sorted(work.items(), key=lambda item: -self._object(*item[0]).size)
            list(pool.map(lambda item: self._restore_object(item[0], item[1]), groups))
            list(pool.map(self._check_assembled, assembled))
        for plan in plans:
            path = self._path(plan.entry)
            os.chmod(path, plan.entry.mode)
            os.utime(path, (plan.entry.mtime, plan.entry.mtime))

    def _object(self, owner: str, key: str) -> ObjectEntry:
        for obj in self._chain.manifests[owner].objects:
            if obj.key == key:
                return obj
        raise IntegrityError(f"backup '{owner}' does not list object '{key}'")

    def _restore_object(
        self, key: tuple[str, str], layers: dict[str, tuple[FilePlan, Layer]]
    ) -> None:
        first_error: DrkitError | None = None
        for repo in self._repos:
            try:
                self._restore_object_from(repo, key, layers)
            except DrkitError as exc:
                first_error = first_error or exc
                self._undo(layers)
                with self._lock:
                    self.events.append(f"object '{key[1]}' unusable in '{repo.name}': {exc}")
                continue
            if first_error is not None:
                with self._lock:
                    self.events.append(f"object '{key[1]}' restored from '{repo.name}'")
            return
        assert first_error is not None
        raise first_error

    def _undo(self, layers: dict[str, tuple[FilePlan, Layer]]) -> None:
        """Forget a failed attempt: files written whole are created again from the next copy
        (pages of assembled files are simply written again)."""
        for plan, _ in layers.values():
            if plan.simple:
                self._path(plan.entry).unlink(missing_ok=True)

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
            repo.storage,
            self._object(owner, object_key),
            [layer.entry for _, layer in layers.values()],
            self._chain.deks[owner],
            owner,
            consume,
            check_object=False,
        )
        for outcome in outcomes:
            if outcome.error is not None:
                raise IntegrityError(
                    f"unable to restore '{outcome.entry.path}' from backup '{owner}':"
                    f" {outcome.error}",
                    hint="run 'drkit verify' to list every damaged file",
                )

    def _path(self, entry: FileEntry) -> Path:
        return self._pgdata / entry.path

    def _create(self, entry: FileEntry) -> None:
        fd = os.open(self._path(entry), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, entry.size)
        finally:
            os.close(fd)

    def _write_whole(self, entry: FileEntry, chunks: Iterator[bytes]) -> None:
        fd = os.open(self._path(entry), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self._progress.advance(len(chunk))
        finally:
            os.close(fd)

    def _write_pages(self, entry: FileEntry, layer: Layer, chunks: Iterator[bytes]) -> None:
        """Write the pages of ``layer``'s frame that its mask selects, at their block offsets."""
        fd = os.open(self._path(entry), os.O_WRONLY)
        try:
            blocks = layer.blocks()
            for block, page in zip(blocks, _pages(chunks), strict=False):
                if block < len(layer.mask) and layer.mask[block]:
                    os.pwrite(fd, page, block * PAGE_SIZE)
                    self._progress.advance(len(page))
        finally:
            os.close(fd)

    def _check_assembled(self, plan: FilePlan) -> None:
        digest = hashlib.sha256()
        with open(self._path(plan.entry), "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != plan.entry.sha256:
            owners = ", ".join(layer.owner for layer in plan.layers)
            raise IntegrityError(
                f"'{plan.entry.path}' assembled from backups {owners} does not match its checksum"
            )


def _pages(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cut a stream of chunks into pages (the last one may be short)."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        whole = len(data) - len(data) % PAGE_SIZE
        view = memoryview(data)
        for offset in range(0, whole, PAGE_SIZE):
            yield bytes(view[offset : offset + PAGE_SIZE])
        carry = bytes(view[whole:])
    if carry:
        yield carry
