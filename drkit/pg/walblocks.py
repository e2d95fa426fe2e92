"""Which blocks changed, read from the WAL itself: drkit's own WAL summary, for servers that keep
none (PostgreSQL 13 to 16, or 17+ with summarize_wal off).

The WAL since the parent started names every block any change touched (the WAL must replay
them all), so a diff/incr can read just those blocks instead of whole changed files, as with the
server's WAL summaries (summaries.py, whose ``ChangedBlocks`` this builds). The records are
parsed in C (_walblocks.c), which also gathers what PostgreSQL's summarizer does beyond block
references: limit blocks of relations created, dropped or truncated, and of whole databases
created, copied or dropped. Anything it cannot vouch for raises NoSummaries, and the backup
then scans changed files whole: a segment neither in pg_wal nor in the archive, a page or record
that does not check out, a stretch with wal_level = minimal, more changed blocks than it keeps.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from drkit.pg._walblocks import Scanner
from drkit.pg.summaries import MAX_RANGES, ChangedBlocks, NoSummaries
from drkit.pg.wal import parse_segment_name, segments_between

# XLOG_PAGE_MAGIC per major version: a WAL page of any other version is refused.
PAGE_MAGIC = {13: 0xD106, 14: 0xD10D, 15: 0xD110, 16: 0xD113, 17: 0xD116, 18: 0xD118}
# The record layouts 13 to 18 share except for two codes, which PostgreSQL 15 changed:
# bimg_info's bits of a compressed full-page image (BKPIMAGE_IS_COMPRESSED before; then
# BKPIMAGE_COMPRESS_PGLZ | _LZ4 | _ZSTD), and XLOG_DBASE_DROP's info code (CREATE DATABASE
# gained a second record, XLOG_DBASE_CREATE_WAL_LOG, at 0x10).
COMPRESSED_IMAGE = {13: 0x02, 14: 0x02}
COMPRESSED_IMAGE_15 = 0x04 | 0x08 | 0x10
DBASE_DROP = {13: 0x10, 14: 0x10}
DBASE_DROP_15 = 0x20
# Distinct changed blocks kept at most (4 bytes each): 8 M blocks are 64 GiB of changed pages,
# about when reading the changed files whole costs as much.
MAX_BLOCKS = 2 * MAX_RANGES

# The bytes of a WAL segment file by name, or None when that source does not have it.
SegmentSource = Callable[[str], bytes | None]


def wal_changed_blocks(
    sources: list[SegmentSource],
    major: int,
    system_identifier: int,
    timeline: int,
    since: int,
    until: int,
    segment_size: int,
) -> ChangedBlocks:
    """The main-fork blocks modified by the WAL records in [since, until) of ``timeline``; each
    segment comes from the first of ``sources`` that has it. Raises NoSummaries saying why not."""
    magic = PAGE_MAGIC.get(major)
    if magic is None:
        raise NoSummaries(f"drkit reads the WAL of PostgreSQL 13 to 18, not of {major}")
    scanner = Scanner(
        magic,
        COMPRESSED_IMAGE.get(major, COMPRESSED_IMAGE_15),
        system_identifier,
        segment_size,
        MAX_BLOCKS,
        since,
        DBASE_DROP.get(major, DBASE_DROP_15),
    )
    for name in segments_between(timeline, since, until, segment_size):
        data = next((d for d in (source(name) for source in sources) if d is not None), None)
        if data is None:
            raise NoSummaries(f"WAL segment {name} is neither in pg_wal nor in the archive")
        start = parse_segment_name(name, segment_size)[1] * segment_size
        try:
            scanner.feed(data, start, min(until - start, segment_size))
        except ValueError as exc:
            raise NoSummaries(f"WAL segment {name} cannot be read: {exc}") from None
    try:
        relations, minimal, overflow = scanner.result()
    except ValueError as exc:
        raise NoSummaries(str(exc)) from None
    if minimal:
        raise NoSummaries("wal_level was minimal for a while since the parent started")
    if overflow:
        raise NoSummaries(f"the WAL names more than {MAX_BLOCKS} changed blocks")
    ranges: dict[tuple[int, int, int], tuple[array[int], array[int]]] = {}
    limits: dict[tuple[int, int, int], int] = {}
    for spc, db, rel, starts, ends, limit in relations:
        if starts:
            ranges[(spc, db, rel)] = (array("I", starts), array("I", ends))
        if limit is not None:
            limits[(spc, db, rel)] = limit
    if sum(len(starts) for starts, _ in ranges.values()) > MAX_RANGES:
        raise NoSummaries(f"the WAL names more than {MAX_RANGES} changed block ranges")
    return ChangedBlocks(ranges, limits)
