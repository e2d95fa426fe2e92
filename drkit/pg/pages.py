"""PostgreSQL data pages: page checksums and page LSNs, vectorised with numpy.

The checksum is PostgreSQL's (src/include/storage/checksum_impl.h): the 8 KiB page is viewed as
64 rows of 32 uint32 lanes, each lane folded with an FNV-1a variant, two extra rounds of zeroes,
the lanes xor-ed together, xor-ed with the block number, reduced to 1..65535. Computing the 32
lanes for a whole batch of pages at once keeps Python out of the per-page loop; numpy releases the
GIL on these array operations, so backup workers check pages in parallel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from drkit.pg.constants import PAGE_SIZE

_LANES = 32
_ROWS = PAGE_SIZE // (4 * _LANES)
_FNV_PRIME = np.uint32(16777619)
_BASE_OFFSETS = np.array(
    [
        0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
        0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
        0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
        0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
        0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
    ],
    dtype=np.uint32,
)  # fmt: skip

# A relation file: <relfilenode>[_fork][.segment], inside base/<db>/, global/ or a tablespace.
_RELATION_FILE = re.compile(r"^(\d+)(_(fsm|vm|init))?(\.(\d+))?$")
_RELATION_DIR = re.compile(
    r"^(?:base/(?P<db>\d+)|global|pg_tblspc/(?P<ts>\d+)/[^/]+/(?P<tsdb>\d+))$"
)

DEFAULT_TABLESPACE = 1663  # pg_default: base/<database>/
GLOBAL_TABLESPACE = 1664  # pg_global: global/
RelKey = tuple[int, int, int]  # tablespace OID, database OID, relfilenode


def relation_segment(path: str) -> int | None:
    """The segment number of a relation file at ``path`` (PGDATA-relative), None if not one."""
    directory, _, name = path.rpartition("/")
    match = _RELATION_FILE.match(name)
    if match is None or not _RELATION_DIR.match(directory):
        return None
    return int(match.group(5) or 0)


def relation_key(path: str) -> RelKey | None:
    """(tablespace, database, relfilenode) of a main-fork relation file at ``path``
    (PGDATA-relative), as PostgreSQL names it in WAL; None if not one."""
    directory, _, name = path.rpartition("/")
    file, where = _RELATION_FILE.match(name), _RELATION_DIR.match(directory)
    if file is None or where is None or file.group(2):
        return None
    rel = int(file.group(1))
    if where["db"] is not None:
        return (DEFAULT_TABLESPACE, int(where["db"]), rel)
    if where["ts"] is not None:
        return (int(where["ts"]), int(where["tsdb"]), rel)
    return (GLOBAL_TABLESPACE, 0, rel)


def page_checksums(pages: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """PostgreSQL checksums of ``pages`` (uint8, shape n x 8192) at relation ``blocks`` (n,)."""
    words = pages.view("<u4").reshape(-1, _ROWS, _LANES).copy()
    words[:, 0, 2] &= np.uint32(0xFFFF0000)  # pd_checksum (bytes 8-9) counts as zero
    sums = np.broadcast_to(_BASE_OFFSETS, (words.shape[0], _LANES)).copy()
    zero_row = np.zeros_like(sums)
    with np.errstate(over="ignore"):
        for row in range(_ROWS + 2):  # 64 rows of data, then two rounds of zeroes
            tmp = sums ^ (words[:, row, :] if row < _ROWS else zero_row)
            sums = (tmp * _FNV_PRIME) ^ (tmp >> np.uint32(17))
    folded = np.bitwise_xor.reduce(sums, axis=1).astype(np.uint64)
    mixed = (folded ^ blocks.astype(np.uint64)) & np.uint64(0xFFFFFFFF)
    return (mixed % np.uint64(65535) + np.uint64(1)).astype(np.uint16)


@dataclass(frozen=True)
class PageFailure:
    block: int  # block number within the relation file (not the relation)
    expected: int
    found: int


def check_pages(
    data: bytes | memoryview,
    first_block: int | np.ndarray,
    skip_from_lsn: int,
    only: np.ndarray | None = None,
) -> list[PageFailure]:
    """Validate every whole page in ``data`` (or those ``only`` selects, a boolean mask of its
    pages); ``first_block`` is the relation block number of the first page, or an array of the
    block number of every page (pages gathered from several places of a file).

    Pages that are new (pd_upper == 0 and all zero) are valid. Pages whose LSN is at or after
    ``skip_from_lsn`` (the backup start) are not checked: PostgreSQL may be writing them right now
    (a torn read), and WAL replay rewrites them from a full-page image anyway.
    """
    usable = len(data) - len(data) % PAGE_SIZE
    if usable == 0:
        return []
    raw = np.frombuffer(data, dtype=np.uint8, count=usable)
    pages = raw.reshape(-1, PAGE_SIZE)
    blocks = (
        np.arange(first_block, first_block + len(pages), dtype=np.int64)
        if isinstance(first_block, int)
        else first_block[: len(pages)]
    )
    header = pages[:, :24].copy().view("<u4")  # 6 uint32 words of the page header per page
    lsn = (header[:, 0].astype(np.uint64) << np.uint64(32)) | header[:, 1].astype(np.uint64)
    stored = (header[:, 2] & np.uint32(0xFFFF)).astype(np.uint16)
    upper = (header[:, 3] >> np.uint32(16)).astype(np.uint16)
    selected = np.ones(len(pages), dtype=bool) if only is None else only[: len(pages)]
    candidates = selected & (upper != 0) & (lsn < np.uint64(skip_from_lsn))
    new_pages = selected & (upper == 0)
    # A "new" page must be entirely zero, otherwise it is damaged (PostgreSQL's rule too).
    bad_new = np.flatnonzero(new_pages)[pages[new_pages].any(axis=1)]
    failures: list[PageFailure] = []
    index = np.flatnonzero(candidates)
    if index.size:
        computed = page_checksums(pages[index], blocks[index])
        for i in np.flatnonzero(computed != stored[index]):
            block = int(blocks[index[i]])
            failures.append(PageFailure(block, int(computed[i]), int(stored[index[i]])))
    for i in bad_new:
        failures.append(PageFailure(int(blocks[i]), 0, int(stored[i])))
    return sorted(failures, key=lambda f: f.block)


def page_runs(mask: np.ndarray, blocks: np.ndarray) -> list[tuple[int, int, int]]:
    """The runs of selected pages that are consecutive both in the buffer and in the file, as
    (index in the buffer, first block, end block); ``blocks[i]`` is page i's block number."""
    index = np.flatnonzero(mask)
    if not index.size:
        return []
    breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(blocks[index]) != 1))
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [index.size - 1]))
    return [
        (int(index[a]), int(blocks[index[a]]), int(blocks[index[b]]) + 1)
        for a, b in zip(starts, ends, strict=True)
    ]
