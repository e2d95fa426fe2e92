"""Sparse pages: how the chunks of an XOR delta are stored inside their zstd frames.

An XOR delta page (a page XORed with its previous version) is mostly zeros: an update changes a
tuple header, the page header and perhaps adds a tuple. zstd stores such a page in a few dozen
bytes, but decoding it still writes all 8 KiB, mostly zeros, and a restore then XORs them all in:
for a chain of deltas that is most of the decoding. So each chunk's plaintext (a run of pages,
the last possibly partial) is stored as a *record* of its non-zero 8-byte words, which a
restore applies straight to the pages it assembles (repo/layers.py); other readers expand it.

Record layout (little-endian)::

    u64        L: bytes of plaintext (n = ceil(L / 8192) pages)
    n * 128    bitmap: bit j (least significant first) of page i's 128 bytes is set when word j
               of the page (bytes 8j..8j+7) is not zero
    8 * k      the k non-zero words, page by page, in word order

The record describes itself, so a stream of records is read without outside lengths; any length
that does not add up, or a non-zero byte past L, is reported as damage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drkit.errors import IntegrityError
from drkit.pg.constants import PAGE_SIZE

WORDS = PAGE_SIZE // 8  # 8-byte words per page
BITMAP = WORDS // 8  # bitmap bytes per page
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
    bitmap = np.packbits(nonzero, axis=1, bitorder="little")
    return _LENGTH.pack(len(data)) + bitmap.tobytes() + words[nonzero].tobytes()


@dataclass(frozen=True)
class SparsePages:
    """One decoded record: ``size`` bytes of plaintext, as the non-zero words of its pages."""

    size: int
    nonzero: np.ndarray  # bool, (pages, WORDS)
    values: np.ndarray  # "<u8", the non-zero words in page and word order

    @property
    def pages(self) -> int:
        return len(self.nonzero)

    @cached_property
    def starts(self) -> np.ndarray:
        """Index in ``values`` of each page's first word, and the end (pages + 1 entries)."""
        counts = np.count_nonzero(self.nonzero, axis=1)
        return np.concatenate(([0], np.cumsum(counts)))

    @cached_property
    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(page, word) of each value."""
        pages, words = np.nonzero(self.nonzero)
        return pages, words

    def dense(self) -> bytes:
        """The plaintext."""
        return b"".join(self.dense_pieces())

    def dense_pieces(self, pages: int = 128) -> Iterator[bytes]:
        """The plaintext, ``pages`` pages at a time (memory: one piece)."""
        for first in range(0, self.pages, pages):
            end = min(first + pages, self.pages)
            words = np.zeros((end - first, WORDS), dtype="<u8")
            words[self.nonzero[first:end]] = self.values[self.starts[first] : self.starts[end]]
            data = words.view(np.uint8).reshape(-1)
            cut = self.size - first * PAGE_SIZE
            if data[cut:].any():
                raise IntegrityError("sparse pages hold data past their length")
            yield data[:cut].tobytes()


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
        values_at = _LENGTH.size + pages * BITMAP
        if len(buffer) < values_at:
            return None
        bitmap = np.frombuffer(buffer, dtype=np.uint8, count=pages * BITMAP, offset=_LENGTH.size)
        nonzero = np.unpackbits(bitmap, bitorder="little").view(bool).reshape(pages, WORDS)
        end = values_at + 8 * int(np.count_nonzero(nonzero))
        if len(buffer) < end:
            return None
        values = np.frombuffer(buffer, dtype="<u8", count=(end - values_at) // 8, offset=values_at)
        record = SparsePages(size, nonzero, values.copy())
        del bitmap, values  # views of the buffer, which cannot shrink while they exist
        del buffer[:end]
        return record
