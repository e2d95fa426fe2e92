"""PostgreSQL's own incremental base backups (17+): what drkit sends and what it reads back.

Before an incremental ``BASE_BACKUP`` the client uploads the backup manifest of the backup it
builds on (``UPLOAD_MANIFEST``). The server needs only three things of it: the system identifier,
the prior backup's WAL range (its start LSN is where the WAL summaries must begin) and the paths
and sizes of its files (a relation file the prior backup did not have is sent whole).
`backup_manifest` writes such a manifest in PostgreSQL's format (version 2, with the SHA-256
``Manifest-Checksum`` the server checks) from those facts alone.

The server then sends each relation file it can send incrementally as ``INCREMENTAL.<name>``
beside where ``<name>`` would be: a header (magic, block count, truncation block length, the
block numbers in ascending order, padded to a page when there are blocks) followed by those
blocks. The file it stands for is ``max(truncation length, last block + 1)`` blocks long; a block
below the truncation length that is not sent is the prior backup's, one at or above it that is
not sent is zeros (`IncrementalHeader`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from drkit.errors import PostgresError
from drkit.pg.constants import PAGE_SIZE, RELSEG_PAGES
from drkit.pg.wal import format_lsn

INCREMENTAL_MAGIC = 0xD3AE1F0D
INCREMENTAL_PREFIX = "INCREMENTAL."
HEADER_FIELDS = 12  # magic, block count, truncation block length: three 32-bit words
# backup_label lines only an incremental backup has; a server refuses to start from a data
# directory whose backup_label still names them (pg_combinebackup drops them too)
_INCREMENTAL_LABEL_LINES = (b"INCREMENTAL FROM LSN: ", b"INCREMENTAL FROM TLI: ")


@dataclass(frozen=True)
class IncrementalHeader:
    """The header of an INCREMENTAL file: which blocks follow it, and the file's length."""

    blocks: np.ndarray  # block numbers of the pages that follow, ascending (int64)
    truncation: int  # blocks below it not sent are the prior backup's; at or above, zeros
    header_size: int  # bytes before the first page

    @property
    def length(self) -> int:
        """The file's length in blocks."""
        last = int(self.blocks[-1]) + 1 if len(self.blocks) else 0
        return max(self.truncation, last)


def incremental_target(path: str) -> str | None:
    """The relation file an ``INCREMENTAL.<name>`` member stands for (None: not one)."""
    directory, _, name = path.rpartition("/")
    if not name.startswith(INCREMENTAL_PREFIX) or len(name) == len(INCREMENTAL_PREFIX):
        return None
    target = name.removeprefix(INCREMENTAL_PREFIX)
    return f"{directory}/{target}" if directory else target


def read_incremental_header(read: Callable[[int], bytes], path: str) -> IncrementalHeader:
    """Parse the header of INCREMENTAL file ``path`` from ``read(n)`` (exactly n bytes, fewer at
    its end), which is left at the first page. The words are in the server's byte order: the
    magic number tells which."""
    head = read(HEADER_FIELDS)
    if len(head) < HEADER_FIELDS:
        raise _damaged(path, "is shorter than its header")
    order = "<"
    if struct.unpack("<I", head[:4])[0] != INCREMENTAL_MAGIC:
        order = ">"
        if struct.unpack(">I", head[:4])[0] != INCREMENTAL_MAGIC:
            raise _damaged(path, "has no incremental file magic number")
    _, count, truncation = struct.unpack(f"{order}3I", head)
    if count > RELSEG_PAGES or truncation > RELSEG_PAGES:
        raise _damaged(path, f"names {count} blocks and a length of {truncation} blocks")
    numbers = read(4 * count)
    if len(numbers) < 4 * count:
        raise _damaged(path, "is shorter than its block list")
    blocks = np.frombuffer(numbers, dtype=f"{order}u4").astype(np.int64)
    if len(blocks) and (np.any(np.diff(blocks) <= 0) or blocks[-1] >= RELSEG_PAGES):
        raise _damaged(path, "lists its blocks out of order or past a segment's end")
    size = HEADER_FIELDS + 4 * count
    if count and size % PAGE_SIZE:
        padding = PAGE_SIZE - size % PAGE_SIZE
        if len(read(padding)) < padding:
            raise _damaged(path, "is shorter than its header")
        size += padding
    return IncrementalHeader(blocks, truncation, size)


def without_incremental_lines(backup_label: bytes) -> bytes:
    """backup_label as a restored data directory needs it: an incremental backup's label names
    the backup it builds on, and a server refuses to start from a label that does."""
    lines = backup_label.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.startswith(_INCREMENTAL_LABEL_LINES))


def backup_manifest(
    system_identifier: int,
    files: Iterable[tuple[str, int]],
    timeline: int,
    start_lsn: int,
    end_lsn: int,
) -> bytes:
    """A backup manifest in PostgreSQL's format for ``UPLOAD_MANIFEST``: the files (path, size)
    of a prior backup and the WAL range it needs, ``Manifest-Checksum`` last (the SHA-256 of
    every line before its own)."""
    lines = [
        '{ "PostgreSQL-Backup-Manifest-Version": 2,\n',
        f'"System-Identifier": {system_identifier},\n',
        '"Files": [\n',
    ]
    entries = [f'{{ "Path": {json.dumps(path)}, "Size": {size} }}' for path, size in files]
    lines.append(",\n".join(entries) + ("\n" if entries else ""))
    lines += [
        "],\n",
        '"WAL-Ranges": [\n',
        f'{{ "Timeline": {timeline}, "Start-LSN": "{format_lsn(start_lsn)}",'
        f' "End-LSN": "{format_lsn(end_lsn)}" }}\n',
        "],\n",
    ]
    body = "".join(lines).encode()
    checksum = hashlib.sha256(body).hexdigest()
    return body + f'"Manifest-Checksum": "{checksum}"}}\n'.encode()


def _damaged(path: str, problem: str) -> PostgresError:
    return PostgresError(f"the server's incremental file '{path}' {problem}")
