"""Which blocks changed, from PostgreSQL's WAL summaries (17 and later, ``summarize_wal = on``).

The WAL summarizer records, for every range of WAL, the blocks each WAL record touched and the
*limit block* of each relation fork created or truncated in it (0 when created, otherwise the
shortest length it was truncated to); relation 0 of a database and tablespace stands for all of
its relations (a database created, copied or dropped: CREATE DATABASE, ALTER DATABASE SET
TABLESPACE copy directories without logging their blocks). That is what ``pg_basebackup
--incremental`` builds on, and what walblocks.py gathers from the WAL itself before 17. A
diff/incr backup uses it the same way: for a relation file the parent stored, it reads only the
blocks modified since the parent's start LSN, every block at or past the parent's end or a limit
block, and nothing else; files the parent does not have are read whole, as without summaries.

Summaries are used only when they cover the whole range, parent start to this backup's start, on
one timeline; otherwise the backup reads the WAL itself (walblocks.py) or changed files whole
(page-LSN scan), and says why.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from drkit.pg.constants import RELSEG_PAGES
from drkit.pg.wal import format_lsn

if TYPE_CHECKING:
    from drkit.pg.pages import RelKey


class NoSummaries(Exception):
    """The WAL summaries cannot say what changed (the message says why)."""


@dataclass(frozen=True)
class SegmentReads:
    """What to read of one segment file: block ranges (file-relative, ascending), then every
    block from ``tail_from`` to the end of the file."""

    ranges: tuple[tuple[int, int], ...]
    tail_from: int

    def rewritten(self, blocks: int) -> float:
        """The fraction of the blocks the parent had of it (of a file of ``blocks`` now) that
        changed: new blocks past the parent's end are not counted."""
        old = min(self.tail_from, blocks)
        changed = sum(min(end, old) - start for start, end in self.ranges if start < old)
        return changed / old if old else 0.0

    def spans(self, blocks: int) -> list[tuple[int, int]]:
        """The block ranges to read of a file of ``blocks`` blocks, merged."""
        merged: list[tuple[int, int]] = []
        wanted = [(s, min(e, blocks)) for s, e in self.ranges if s < min(e, blocks)]
        if self.tail_from < blocks:
            wanted.append((self.tail_from, blocks))
        for start, end in sorted(wanted):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged


@dataclass(frozen=True)
class ChangedBlocks:
    """Main-fork blocks modified in an LSN range, per relation, and the relations' limit blocks.
    The ranges are kept compact (two arrays of 32-bit block numbers per relation) and their
    number capped (MAX_RANGES), so memory stays bounded whatever the database size."""

    ranges: dict[RelKey, tuple[array[int], array[int]]]  # starts and ends [start, end), ascending
    limits: dict[RelKey, int]

    @classmethod
    def of(cls, ranges: dict[RelKey, list[tuple[int, int]]], limits: dict[RelKey, int]) -> Self:
        """From sorted, disjoint [start, end) block ranges per relation."""
        packed = {
            key: (array("I", (a for a, _ in spans)), array("I", (b for _, b in spans)))
            for key, spans in ranges.items()
        }
        return cls(packed, limits)

    def segment_reads(self, key: RelKey, segment: int, parent_blocks: int) -> SegmentReads | None:
        """What a delta of segment ``segment`` of relation ``key`` must read, given the parent's
        size of that file in blocks; None when all of it must be read (created or truncated
        below this segment's start within the range)."""
        first = segment * RELSEG_PAGES
        tail_from = parent_blocks
        limits = (self.limits.get(key), self.limits.get((key[0], key[1], 0)))  # rel 0: database
        limit = min((x for x in limits if x is not None), default=None)
        if limit is not None:
            if limit <= first:
                return None
            tail_from = min(tail_from, limit - first)
        starts, ends = self.ranges.get(key, (array("I"), array("I")))
        last = first + RELSEG_PAGES
        ranges = tuple(
            (max(starts[i], first) - first, min(ends[i], last) - first)
            for i in range(bisect_right(ends, first), bisect_left(starts, last))
        )
        return SegmentReads(ranges, tail_from)


# Every summary file of the timeline overlapping [since, until), oldest first.
SUMMARIES_SQL = """
SELECT start_lsn, end_lsn FROM pg_available_wal_summaries()
WHERE tli = %(tli)s::bigint AND end_lsn > %(since)s::pg_lsn AND start_lsn < %(until)s::pg_lsn
ORDER BY start_lsn
"""

# Their main-fork contents: modified blocks as [start, end) ranges (consecutive blocks grouped
# in the server, so a dense change is a few rows), and each relation's lowest limit block.
CONTENTS_SQL = """
WITH s AS (
    SELECT start_lsn, end_lsn FROM pg_available_wal_summaries()
    WHERE tli = %(tli)s::bigint AND end_lsn > %(since)s::pg_lsn AND start_lsn < %(until)s::pg_lsn
), c AS MATERIALIZED (
    SELECT c.reltablespace AS ts, c.reldatabase AS db, c.relfilenode AS rel,
           c.relblocknumber AS blk, c.is_limit_block AS is_limit
    FROM s, LATERAL pg_wal_summary_contents(%(tli)s::bigint, s.start_lsn, s.end_lsn) c
    WHERE c.relforknumber = 0
), b AS (
    SELECT DISTINCT ts, db, rel, blk FROM c WHERE NOT is_limit
)
SELECT * FROM (
    SELECT ts, db, rel, false AS is_limit, min(blk) AS start, max(blk) + 1 AS stop
    FROM (SELECT *, blk - row_number() OVER (PARTITION BY ts, db, rel ORDER BY blk) AS run
          FROM b) r
    GROUP BY ts, db, rel, run
    UNION ALL
    SELECT ts, db, rel, true, min(blk), NULL FROM c WHERE is_limit GROUP BY ts, db, rel
) x ORDER BY ts, db, rel, is_limit, start
"""
# At 8 bytes a range, 32 MiB; a change that scattered is read about as fast by scanning files.
MAX_RANGES = 4_000_000


def check_coverage(summaries: list[tuple[int, int]], since: int, until: int) -> None:
    """Raise NoSummaries unless the (start, end) LSN ranges cover [since, until) without a gap."""
    reached = since
    for start, end in summaries:
        if start > reached:
            break
        reached = max(reached, end)
    if reached < until:
        raise NoSummaries(
            f"the server's WAL summaries do not cover {format_lsn(reached)}..{format_lsn(until)}"
            " (summarize_wal was off, or wal_summary_keep_time removed them)"
        )


def changed_blocks(rows: Iterable[tuple[int, int, int, bool, int, int | None]]) -> ChangedBlocks:
    """Build ChangedBlocks from CONTENTS_SQL's rows (ordered by relation, then block); raises
    NoSummaries past MAX_RANGES ranges: changes that scattered are read as fast whole."""
    max_ranges = MAX_RANGES
    ranges: dict[RelKey, tuple[array[int], array[int]]] = {}
    limits: dict[RelKey, int] = {}
    count = 0
    for ts, db, rel, is_limit, start, end in rows:
        key = (int(ts), int(db), int(rel))
        if is_limit:
            limits[key] = int(start)
            continue
        assert end is not None
        count += 1
        if count > max_ranges:
            raise NoSummaries(f"the WAL summaries name more than {max_ranges} changed block ranges")
        starts, ends = ranges.setdefault(key, (array("I"), array("I")))
        starts.append(int(start))
        ends.append(int(end))
    return ChangedBlocks(ranges, limits)
