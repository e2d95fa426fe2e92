"""PostgreSQL data pages: page checksums and page LSNs, vectorised with numpy.

The checksum is PostgreSQL's (src/include/storage/checksum_impl.h): the 8 KiB page is viewed as
64 rows of 32 uint32 lanes, each lane folded with an FNV-1a variant, two extra rounds of zeroes,
the lanes xor-ed together, xor-ed with the block number, reduced to 1..65535. It is computed in
C (drkit/pg/_checksum.c: one vectorised pass per page, where numpy needed 66 passes over a batch
of pages with a temporary array each), with the GIL released so backup workers check pages in
parallel; numpy selects which pages to check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from drkit.pg._checksum import checksums
from drkit.pg.constants import PAGE_SIZE

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
        computed = np.empty(index.size, dtype=np.uint16)
        checksums(raw, index, np.ascontiguousarray(blocks[index], dtype=np.int64), computed)
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
