"""A delta restore that trusts timestamps (``restore --delta --trust-timestamps``): judge an
existing file by its size and mtime instead of reading it.

A restore gives every file the mtime its manifest records, and PostgreSQL gives a file it writes
a new one. So a file of the stale copy whose size and mtime are those the backup recorded is
taken to hold the backup's bytes, and is kept without being read. When the copy was itself
restored from another backup of the repository (its ``backup_label``, or the
``backup_label.old`` PostgreSQL leaves after recovery, names it: the *origin*), a file whose size
and mtime are those the origin recorded is taken to hold the origin's bytes: the two manifests'
checksums then say which of its chunks differ, and only those are written, again without reading
the file. Any other file is compared by its checksums, as without the option.

The risk, which is why this is never the default: a file changed without a new mtime (damage on
disk, a tool that restores mtimes, a clock set back) is kept as it is, unproven. A file the
source changed in the last ``MTIME_SAFETY_S`` before a backup started, or while it ran, may have
changed again within the same clock tick after it was read; it is never trusted, the same margin
a backup uses before it trusts a file's mtime.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from drkit.errors import DrkitError
from drkit.repo.chain import FilePlan
from drkit.repo.label import BackupLabel
from drkit.repo.manifest import FileEntry, Manifest
from drkit.repo.repository import Repository

MTIME_SAFETY_S = 2.0
# A restored mtime goes through a float and back: equal within a microsecond is the same mtime
MTIME_TOLERANCE_S = 1e-6
_LABEL_LINE = re.compile(rb"^LABEL: (\S+)$", re.MULTILINE)
_LABEL_FILES = ("backup_label", "backup_label.old")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judged:
    """A file judged by its size and mtime: ``write`` lists its chunks to write into it (empty:
    it is kept as it is); None: it is written whole."""

    write: frozenset[int] | None


def load_trust(repo: Repository, target: Manifest, pgdata: Path) -> Trust:
    """The judge of ``pgdata``'s files for a restore of ``target`` from ``repo``, with the
    origin's manifest when the copy names one that ``repo`` holds."""
    label = origin_label(pgdata)
    origin: Manifest | None = None
    if label is not None and label.text == target.label:
        origin = target
    elif label is not None:
        try:
            origin, _ = repo.load_manifest(label)
        except DrkitError as exc:
            log.info(
                f"delta: the copy's origin '{label}' is not usable, its files are compared"
                f" by checksum: {exc.message}"
            )
    return Trust(target, origin)


def origin_label(pgdata: Path) -> BackupLabel | None:
    """The backup the data directory ``pgdata`` was restored from, as its backup_label (or,
    once recovery ran, backup_label.old) names it; None when neither names a backup label.
    Read without following a link."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for name in _LABEL_FILES:
        try:
            fd = os.open(pgdata / name, flags)
        except OSError:
            continue
        with open(fd, "rb") as file:
            try:
                match = _LABEL_LINE.search(file.read(4096))
            except OSError:  # not a file (a directory, a device): no label
                continue
        if match:
            try:
                return BackupLabel(match.group(1).decode("ascii", "replace"))
            except ValueError:
                return None
        return None
    return None


class Trust:
    """Judges existing files against the backup restored (``target``) and the backup the copy
    was restored from (``origin``, when known)."""

    def __init__(self, target: Manifest, origin: Manifest | None) -> None:
        before = target.start_time.timestamp()
        if origin is not None:  # the copy holds the bytes its restore read, no later ones
            before = min(before, origin.start_time.timestamp())
        self._before = before - MTIME_SAFETY_S
        self._origin: dict[str, FileEntry] = {}
        self._origin_before = 0.0
        self.origin = origin.label if origin is not None else None
        if origin is not None:
            self._origin_before = origin.start_time.timestamp() - MTIME_SAFETY_S
            self._origin = {f.path: f for f in origin.files}

    def judge(
        self, plan: FilePlan, st: os.stat_result, chunks: list[tuple[int, int, str]] | None
    ) -> Judged | None:
        """What to write of the existing file ``st`` to restore ``plan`` (``chunks``: its
        chunks' bounds and checksums, when it is restored chunk by chunk); None when its size and
        mtime say nothing and it must be compared by its checksums."""
        entry = plan.entry
        if st.st_nlink != 1:
            return None
        if _same(entry, st) and entry.mtime < self._before:
            return Judged(frozenset())
        old = self._origin.get(entry.path)
        if old is None or not _same(old, st) or old.mtime >= self._origin_before:
            return None
        # The file holds the origin's bytes of it
        if old.sha256 is not None and (old.size, old.sha256) == (entry.size, entry.sha256):
            return Judged(frozenset())
        kept = _chunk_bounds(old)
        if chunks is None or kept is None:
            return Judged(None)
        write = {i for i, chunk in enumerate(chunks) if chunk not in kept}
        if not write and old.size != entry.size:
            write.add(len(chunks) - 1)  # the file is cut to size as its last chunk is written
        return Judged(None if len(write) == len(chunks) else frozenset(write))


def _same(entry: FileEntry, st: os.stat_result) -> bool:
    return st.st_size == entry.size and abs(st.st_mtime - entry.mtime) < MTIME_TOLERANCE_S


def _chunk_bounds(entry: FileEntry) -> set[tuple[int, int, str]] | None:
    """(start, end, sha256) of each chunk of a file stored whole in chunks; None otherwise."""
    if entry.pages is not None or not entry.chunks:
        return None
    starts = [chunk[0] for chunk in entry.chunks]
    ends = [*starts[1:], entry.size]
    return {(a, b, c[2]) for a, b, c in zip(starts, ends, entry.chunks, strict=True)}
