"""The WAL archive of a repository as restore, info and verify see it: what is there, what is not.

``WalArchive`` lists ``wal/`` once (a snapshot; ``refresh()`` lists again) and answers from that:
timelines, segments per timeline, the last segment, gaps in a range, contiguous ranges. It reads
and decrypts what it must: timeline history files, the push time of an object (a ranged read of
its clear header only), and, when no backup manifest tells it, one segment's first page for the
segment size.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from drkit.errors import DrkitError, IntegrityError
from drkit.pg.wal import parse_lsn, parse_segment_name, segment_name
from drkit.repo.wal_names import WAL_PREFIX, WalName, history_name, parse_wal_name
from drkit.repo.wal_objects import RepoLike, WalKeyring, read_header, read_object

__all__ = ["DEFAULT_SEGMENT_SIZE", "TimelineSummary", "WalArchive"]

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_LONG_HEADER = struct.Struct("<HHIQIxxxxQII")  # XLogLongPageHeaderData; xlp_seg_size is field 6


@dataclass
class TimelineSummary:
    """What ``info`` shows of one timeline: the archived range and the holes in it."""

    timeline: int
    first: str | None  # oldest archived segment
    last: str | None  # newest archived segment
    segments: int
    missing: list[tuple[str, str]] = field(default_factory=list)  # runs of absent segments
    missing_count: int = 0
    history: bool = False  # its .history file is archived
    partial: list[str] = field(default_factory=list)  # archived .partial files

    def as_dict(self) -> dict[str, Any]:
        return {
            "timeline": self.timeline,
            "first": self.first,
            "last": self.last,
            "segments": self.segments,
            "missing": [list(run) for run in self.missing],
            "missing_count": self.missing_count,
            "history": self.history,
            "partial": self.partial,
        }


class _Enough(Exception):
    """Stops decoding once the first bytes are in."""


class WalArchive:
    """The archived WAL of one repository (``repo``: a Repository, or anything with ``name``,
    ``storage`` and ``keys``)."""

    def __init__(
        self,
        repo: RepoLike,
        *,
        segment_size: int | None = None,
        keyring: WalKeyring | None = None,
    ) -> None:
        self.repo = repo
        self.keyring = keyring or WalKeyring(repo, cache=True)
        self._segment_size = segment_size
        self._listing: dict[int, dict[str, WalName]] | None = None

    # -- listing ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget the listing; the next question lists the repository again."""
        self._listing = None

    def _files(self) -> dict[int, dict[str, WalName]]:
        if self._listing is None:
            listing: dict[int, dict[str, WalName]] = {}
            for obj in self.repo.storage.list(WAL_PREFIX):
                try:
                    wal = parse_wal_name(obj.key.rsplit("/", 1)[-1])
                except ValueError:
                    continue  # not drkit's
                if wal.key == obj.key:
                    listing.setdefault(wal.timeline, {})[wal.name] = wal
            self._listing = listing
        return self._listing

    def timelines(self) -> list[int]:
        """Every timeline with at least one archived file, ascending."""
        return sorted(self._files())

    def files(self, timeline: int) -> list[str]:
        """Every archived file name of ``timeline`` (segments, .partial, .backup, .history)."""
        return sorted(self._files().get(timeline, {}))

    def segments(self, timeline: int) -> list[str]:
        """Archived (complete) segment names of ``timeline``, ascending."""
        return sorted(n for n, w in self._files().get(timeline, {}).items() if w.kind == "segment")

    def has(self, name: str) -> bool:
        wal = parse_wal_name(name)
        return name in self._files().get(wal.timeline, {})

    def last_segment(self, timeline: int) -> str | None:
        segments = self.segments(timeline)
        return segments[-1] if segments else None

    def find_gaps(self, timeline: int, from_segment: str, to_segment: str) -> list[str]:
        """Segments of ``timeline`` from ``from_segment`` to ``to_segment`` (inclusive; only their
        log and segment numbers count, not their timeline part) that are not archived."""
        size = self.segment_size
        first = parse_segment_name(from_segment, size)[1]
        last = parse_segment_name(to_segment, size)[1]
        present = self._files().get(timeline, {})
        names = (segment_name(timeline, segno, size) for segno in range(first, last + 1))
        return [name for name in names if name not in present]

    def ranges(self, timeline: int) -> list[tuple[str, str]]:
        """Contiguous runs of archived segments of ``timeline``: [(first, last), ...]."""
        size = self.segment_size
        runs: list[tuple[str, str]] = []
        previous = -2
        for name in self.segments(timeline):
            segno = parse_segment_name(name, size)[1]
            if segno == previous + 1:
                runs[-1] = (runs[-1][0], name)
            else:
                runs.append((name, name))
            previous = segno
        return runs

    def summarize(self) -> list[TimelineSummary]:
        """One summary per timeline: range, count, missing runs inside the range."""
        summaries = []
        for timeline in self.timelines():
            segments = self.segments(timeline)
            files = self._files()[timeline]
            summary = TimelineSummary(
                timeline,
                segments[0] if segments else None,
                segments[-1] if segments else None,
                len(segments),
                history=history_name(timeline) in files,
                partial=sorted(n for n, w in files.items() if w.kind == "partial"),
            )
            runs = self.ranges(timeline)
            for (_, end), (start, _) in itertools.pairwise(runs):
                gap = self.find_gaps(timeline, end, start)
                summary.missing.append((gap[0], gap[-1]))
                summary.missing_count += len(gap)
            summaries.append(summary)
        return summaries

    # -- contents ---------------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        """The whole decrypted, authenticated file (for small files: .history, .backup)."""
        parts: list[bytes] = []
        read_object(self.repo, self.keyring, parse_wal_name(name), parts.append)
        return b"".join(parts)

    def check(self, name: str) -> None:
        """Reads, authenticates and decompresses one archived file; raises IntegrityError (or
        ObjectNotFound, or a key error) when it cannot be read back."""
        read_object(self.repo, self.keyring, parse_wal_name(name), lambda _chunk: None)

    def history(self, timeline: int) -> list[tuple[int, int]]:
        """The archived history of ``timeline``: [(parent timeline, switch LSN), ...], oldest
        first, as in its ``.history`` file. Timeline 1 has none: []. Raises ObjectNotFound when
        a later timeline's history file is not archived."""
        if timeline == 1:
            return []
        text = self.read(history_name(timeline)).decode("utf-8", errors="replace")
        entries = []
        for line in text.splitlines():
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                entries.append((int(fields[0]), parse_lsn(fields[1])))
            except (ValueError, IndexError):
                raise IntegrityError(
                    f"timeline history file {history_name(timeline)} has a malformed line: {line!r}"
                ) from None
        return entries

    def pushed_at(self, name: str) -> datetime:
        """When ``name`` was pushed, from its object's clear header (not authenticated)."""
        return read_header(self.repo, parse_wal_name(name)).pushed_at

    # -- segment size -----------------------------------------------------------------------------

    @property
    def segment_size(self) -> int:
        """The cluster's WAL segment size: as given, else from the newest backup manifest, else
        from the first page of the oldest archived segment, else 16 MiB."""
        if self._segment_size is None:
            self._segment_size = (
                self._size_from_manifest() or self._size_from_segment() or DEFAULT_SEGMENT_SIZE
            )
        return self._segment_size

    def _size_from_manifest(self) -> int | None:
        backups = getattr(self.repo, "backups", None)
        load_manifest = getattr(self.repo, "load_manifest", None)
        if backups is None or load_manifest is None:
            return None
        try:
            labels = backups()
            if not labels:
                return None
            return int(load_manifest(labels[-1])[0].wal_segment_size)
        except DrkitError:
            return None

    def _size_from_segment(self) -> int | None:
        for timeline in self.timelines():
            for name in self.segments(timeline)[:1]:
                head = bytearray()

                def take(chunk: bytes, head: bytearray = head) -> None:
                    head.extend(chunk[: _LONG_HEADER.size])
                    if len(head) >= _LONG_HEADER.size:
                        raise _Enough

                try:
                    read_object(self.repo, self.keyring, parse_wal_name(name), take)
                except _Enough:
                    size = _LONG_HEADER.unpack_from(bytes(head))[6]
                    if 1 << 20 <= size <= 1 << 30 and not size & (size - 1):
                        return int(size)
                except DrkitError:
                    continue
        return None
