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
Applying the words is the one loop written in C (_sparse.c, which checks each index as it goes):
in numpy it took a dozen passes over index arrays, most of a chain restore's extra time.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drkit.codec._sparse import xor_words
from drkit.errors import IntegrityError

if TYPE_CHECKING:
    import numpy as np

# The record format's page: fixed by the format (and _sparse.c), not read from a cluster. It is
# PostgreSQL's block size, which drkit requires (drkit/pg/constants.py).
PAGE_SIZE = 8192

WORDS = PAGE_SIZE // 8  # 8-byte words per page
_LENGTH = struct.Struct("<Q")


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """The record of ``data`` (pages, the last possibly partial)."""
    import numpy as np  # numpy only where pages are (a full restore never gets here)

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
    """One record, checked to hold ``pages`` pages: ``size`` bytes of plaintext."""

    size: int
    record: bytes | memoryview

    @property
    def pages(self) -> int:
        return -(-self.size // PAGE_SIZE)

    def xor_into(self, window: np.ndarray, first: int, rows: np.ndarray) -> None:
        """XOR the words of pages ``first``, ``first + 1``... into ``window`` (whole pages): page
        ``first + i`` into window page ``rows[i]`` (-1: not at all). Word indexes are checked
        (below 1024, increasing within a page) as they are applied."""
        import numpy as np

        try:
            xor_words(window, self.record, first, rows.astype(np.int64, copy=False))
        except ValueError as exc:
            raise IntegrityError(str(exc)) from None

    def dense(self) -> bytes:
        """The plaintext."""
        return b"".join(self.dense_pieces())

    def dense_pieces(self, pages: int = 128) -> Iterator[bytes]:
        """The plaintext, ``pages`` pages at a time (memory: one piece)."""
        import numpy as np

        rows = np.arange(pages, dtype=np.int64)
        for first in range(0, self.pages, pages):
            count = min(pages, self.pages - first)
            window = np.zeros(count * PAGE_SIZE, dtype=np.uint8)
            self.xor_into(window, first, rows[:count])
            cut = self.size - first * PAGE_SIZE
            if window[cut:].any():
                raise IntegrityError("sparse pages hold data past their length")
            yield window[:cut].tobytes()


def expand(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The plaintext of the records in ``pieces``."""
    records = SparseStream()
    for piece in pieces:
        for record in records.feed(piece):
            yield from record.dense_pieces()
    records.finish()


class SparseStream:
    """Reads records from decompressed pieces of any size (the pieces of one record held at a
    time, joined once it is complete; its word indexes are checked where it is applied). The
    pieces are kept, not copied: they must not change once fed (decoders yield new bytes)."""

    def __init__(self) -> None:
        self._pieces: list[bytes | memoryview] = []
        self._held = 0  # bytes in them
        self._need = _LENGTH.size  # bytes held before the record being read can be complete

    def feed(self, piece: bytes | memoryview) -> list[SparsePages]:
        """The records that ``piece`` completes."""
        self._pieces.append(piece)
        self._held += len(piece)
        if self._held < self._need:
            return []
        data = memoryview(b"".join(self._pieces) if len(self._pieces) > 1 else piece)
        records = []
        while len(data) >= (need := _needed(data)):
            records.append(SparsePages(_LENGTH.unpack_from(data)[0], data[:need]))
            data = data[need:]
        self._pieces, self._held, self._need = [data] if data else [], len(data), need
        return records

    def finish(self) -> None:
        if self._held:
            raise IntegrityError(f"sparse pages end inside a record ({self._held} bytes)")


def _needed(data: memoryview) -> int:
    """The length of the record at the start of ``data`` or, if ``data`` is too short to tell,
    more than ``len(data)``: the bytes needed to tell more."""
    if len(data) < _LENGTH.size:
        return _LENGTH.size
    (size,) = _LENGTH.unpack_from(data)
    index_at = _LENGTH.size + 2 * -(-size // PAGE_SIZE)
    if len(data) < index_at:
        return index_at
    import numpy as np

    counts = np.frombuffer(data, dtype="<u2", count=(index_at - _LENGTH.size) // 2, offset=8)
    return index_at + 10 * int(counts.sum(dtype=np.int64))
