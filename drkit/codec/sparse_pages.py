"""Sparse pages: how the chunks of an XOR delta are stored inside their zstd frames.

An XOR delta page (a page XORed with its previous version) is mostly zeros: an update changes a
tuple header, the page header and perhaps adds a tuple. zstd stores such a page in a few dozen
bytes, but decoding it still writes all 8 KiB, mostly zeros, and a restore then XORs them all in:
for a chain of deltas that is most of the decoding. So each chunk's plaintext (a run of pages,
the last possibly partial) is stored as a *record* of its non-zero 8-byte words, which a
restore applies straight to the pages it assembles (repo/layers.py); other readers expand it.

Record layout (little-endian)::

    u64        L: bytes of plaintext (n = ceil(L / 8192) pages)
    n * u16    how many of each page's 8-byte words are not zero
    k * u16    which words they are (0-1023, increasing within a page), page by page
    k * u64    their values, in the same order

The record describes itself, so a stream of records is read without outside lengths; any length
that does not add up, a word index out of order, or a non-zero byte past L is reported as damage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drkit.errors import IntegrityError
from drkit.pg.constants import PAGE_SIZE

WORDS = PAGE_SIZE // 8  # 8-byte words per page
_LENGTH = struct.Struct("<Q")


def encode(data: bytes | memoryview) -> bytes:
    """The record of ``data`` (pages, the last possibly partial)."""
    count = -(-len(data) // PAGE_SIZE)
    if len(data) == count * PAGE_SIZE:
        words = np.frombuffer(data, dtype="<u8").reshape(count, WORDS)
    else:
        padded = np.zeros(count * WORDS, dtype="<u8")
        padded.view(np.uint8)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        words = padded.reshape(count, WORDS)
    nonzero = words != 0
    counts = np.count_nonzero(nonzero, axis=1).astype("<u2")
    index = np.nonzero(nonzero)[1].astype("<u2")
    return _LENGTH.pack(len(data)) + counts.tobytes() + index.tobytes() + words[nonzero].tobytes()


@dataclass(frozen=True)
class SparsePages:
    """One decoded record: ``size`` bytes of plaintext, as the non-zero words of its pages."""

    size: int
    starts: np.ndarray  # index of each page's first word below, and the end (pages + 1 entries)
    index: np.ndarray  # "<u2": of each non-zero word, its place in its page
    values: np.ndarray  # "<u8": of each non-zero word, its value

    @property
    def pages(self) -> int:
        return len(self.starts) - 1

    @cached_property
    def page(self) -> np.ndarray:
        """Of each non-zero word, its page."""
        return np.repeat(np.arange(self.pages), np.diff(self.starts))

    def dense(self) -> bytes:
        """The plaintext."""
        return b"".join(self.dense_pieces())

    def dense_pieces(self, pages: int = 128) -> Iterator[bytes]:
        """The plaintext, ``pages`` pages at a time (memory: one piece)."""
        for first in range(0, self.pages, pages):
            end = min(first + pages, self.pages)
            a, b = int(self.starts[first]), int(self.starts[end])
            words = np.zeros((end - first) * WORDS, dtype="<u8")
            words[(self.page[a:b] - first) * WORDS + self.index[a:b]] = self.values[a:b]
            data = words.view(np.uint8)
            cut = self.size - first * PAGE_SIZE
            if data[cut:].any():
                raise IntegrityError("sparse pages hold data past their length")
            yield data[:cut].tobytes()


def expand(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The plaintext of the records in ``pieces``."""
    records = SparseStream()
    for piece in pieces:
        for record in records.feed(piece):
            yield from record.dense_pieces()
    records.finish()


class SparseStream:
    """Reads records from decompressed pieces of any size (one record held at a time)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, piece: bytes | memoryview) -> Iterator[SparsePages]:
        self._buffer += piece
        while (record := self._take()) is not None:
            yield record

    def finish(self) -> None:
        if self._buffer:
            raise IntegrityError(f"sparse pages end inside a record ({len(self._buffer)} bytes)")

    def _take(self) -> SparsePages | None:
        buffer = self._buffer
        if len(buffer) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack_from(buffer)
        pages = -(-size // PAGE_SIZE)
        index_at = _LENGTH.size + 2 * pages
        if len(buffer) < index_at:
            return None
        counts = np.frombuffer(buffer, dtype="<u2", count=pages, offset=_LENGTH.size)
        starts = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        words = int(starts[-1])
        end = index_at + 10 * words
        if len(buffer) < end:
            return None
        index = np.frombuffer(buffer, dtype="<u2", count=words, offset=index_at).copy()
        values = np.frombuffer(buffer, dtype="<u8", count=words, offset=index_at + 2 * words)
        record = SparsePages(size, starts, index, values.copy())
        del counts, values  # views of the buffer, which cannot shrink while they exist
        del buffer[:end]
        _check(record)
        return record


def _check(record: SparsePages) -> None:
    """Word indexes below WORDS and increasing within each page (so no word is set twice)."""
    index = record.index.astype(np.int32)
    first = np.zeros(len(index), dtype=bool)  # the first word of a page
    first[record.starts[:-1][np.diff(record.starts) > 0]] = True
    if index.size and (index.max() >= WORDS or np.any((np.diff(index) <= 0) & ~first[1:])):
        raise IntegrityError("sparse pages have word indexes out of order")
