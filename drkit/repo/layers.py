"""Read the pages of a file's layers (see chain.py) from a repository, a block range at a time.

Used where a file is rebuilt in memory window by window: a restore writing a large file assembled
from a chain, and a backup storing XOR deltas, which needs its base backup's version of every page
it changed. Every layer's pages of a window are XORed into the window, zeroed first: a layer that
stores pages plainly (the masks of plain layers are disjoint) thus lays them, and an XOR layer
applies its difference to the older version the older layers lay, in any order. A restore reads
XOR deltas stored as sparse pages (codec/sparse_pages.py) as records and XORs in only their
non-zero words; everything else comes as plaintext.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, TypeVar, cast

from drkit.codec.frame import HEADER_SIZE, chunk_span, is_sparse, payload_length
from drkit.codec.frame_reader import decode_chunks, decode_frame
from drkit.codec.sparse_pages import SparsePages, SparseStream, expand
from drkit.errors import DrkitError, IntegrityError
from drkit.pg.constants import PAGE_SIZE
from drkit.repo.chain import Layer
from drkit.repo.reader import checked, checked_pieces
from drkit.repo.repository import Repository, file_context

if TYPE_CHECKING:
    import numpy as np

_Piece = TypeVar("_Piece")

# A restore rebuilds a file with XOR layers in sections of this many blocks (32 MiB), one task
# each; a backup ends the chunks of an XOR delta at section boundaries, so that each section
# decodes only its own chunks, not also those it shares with the sections beside it
SECTION_PAGES = 4096


class LayerReader:
    """Decodes the frames of one chain's layers from one repository. Safe to share between
    threads: it keeps each chunked frame's header once read (the runs of one frame that workers
    decode in parallel all need it; on a remote store each read is a request)."""

    def __init__(self, repo: Repository, deks: dict[str, bytes]) -> None:
        self.repo = repo
        self._deks = deks
        self._headers: dict[tuple[str, int], _Header] = {}
        self._lock = threading.Lock()

    def chunk_plaintext(
        self, layer: Layer, low: int, high: int, hashing: bool, reuse: bool = False
    ) -> Generator[tuple[int, Iterator[bytes | memoryview]], None, None]:
        """Chunks [low, high) of ``layer``'s frame, read in one pass (one request from a remote
        store): each chunk's index with its plaintext as it decodes, the chunk's size (and with
        ``hashing`` its checksum) checked at its end. Read each chunk's pieces to their end
        before taking the next chunk; with ``reuse`` (see decode_chunks), a piece is valid only
        until then."""
        for index, pieces in self._each_chunk(layer, low, high, hashing, False, reuse):
            yield index, cast(Iterator[bytes | memoryview], pieces)

    def pieces(
        self, layer: Layer, hashing: bool, start: int, end: int
    ) -> tuple[Iterator[bytes | SparsePages], int]:
        """The plaintext of ``layer``'s frame that holds bytes [start, end) of it: from the chunk
        holding byte ``start`` through the one holding byte ``end - 1`` (the whole frame when it
        is not chunked), with the frame byte it begins at. Without ``hashing`` (a file checked
        whole), sparse pages come as their records."""
        entry = layer.entry
        if not entry.chunks:
            return _naming(layer, self._frame_pieces(layer, hashing)), 0
        starts = [chunk[0] for chunk in entry.chunks]
        low, high = bisect_right(starts, start) - 1, bisect_right(starts, end - 1)
        pieces = self._chunks(layer, low, high, hashing, records=not hashing)
        return _naming(layer, pieces), starts[low]

    def _chunks(
        self, layer: Layer, low: int, high: int, hashing: bool, records: bool
    ) -> Iterator[bytes | SparsePages]:
        """Chunks [low, high) of ``layer``'s frame as they decode (see _each_chunk), in one
        sequence."""
        for _, pieces in self._each_chunk(layer, low, high, hashing, records, reuse=False):
            yield from cast(Iterator[bytes | SparsePages], pieces)  # not reused: new objects

    def _each_chunk(
        self, layer: Layer, low: int, high: int, hashing: bool, records: bool, reuse: bool
    ) -> Iterator[tuple[int, Iterator[bytes | memoryview | SparsePages]]]:
        """Chunks [low, high) of ``layer``'s frame, read by one sequential read and decrypted
        in one pass, each with its index: its plaintext as it decodes, or with ``records`` a
        sparse frame's records as stored; each chunk's size (and with ``hashing`` its checksum)
        checked at its end."""
        entry, storage = layer.entry, self.repo.storage
        chunks = entry.chunks or []
        header = self._header(layer)
        sparse = is_sparse(header)
        payload_end = payload_length(header, entry.length)
        bounds = [chunk[1] for chunk in chunks[low:high]]
        bounds.append(chunks[high][1] if high < len(chunks) else payload_end)
        offset, length = chunk_span(header, entry.length, bounds[0], bounds[-1])
        dek, context = self._deks[layer.owner], file_context(layer.owner, entry.path)
        ends = [chunk[0] for chunk in chunks[low + 1 : high]]
        ends.append(chunks[high][0] if high < len(chunks) else entry.payload_size)
        sizes = [end - chunk[0] for chunk, end in zip(chunks[low:high], ends, strict=True)]
        with storage.open_read(
            entry.object, entry.offset + offset, length, sequential=True
        ) as stream:
            decoded = decode_chunks(
                header, stream.read, entry.length, dek, context, bounds, sizes, reuse=reuse
            )
            for index, size in zip(range(low, high), sizes, strict=True):
                sha256 = chunks[index][2] if hashing else None
                pieces = _one_chunk(decoded)
                name = f"chunk {index} of '{entry.path}'"
                if sparse:  # never decoded whole into a reused buffer: new objects
                    records_read = cast(Iterator[bytes], pieces)
                    if records:
                        yield index, _records(records_read, size, name)
                    else:
                        yield index, checked_pieces(expand(records_read), size, sha256, name)
                else:
                    yield index, checked_pieces(pieces, size, sha256, name)

    def _header(self, layer: Layer) -> bytes:
        """The header of ``layer``'s frame, read once however many workers ask for it."""
        entry = layer.entry
        with self._lock:
            slot = self._headers.setdefault((entry.object, entry.offset), _Header())
        with slot.lock:
            if slot.data is None:
                slot.data = self.repo.storage.read_bytes(entry.object, entry.offset, HEADER_SIZE)
            return slot.data

    def _frame_pieces(self, layer: Layer, hashing: bool) -> Iterator[bytes | SparsePages]:
        entry, dek, storage = layer.entry, self._deks[layer.owner], self.repo.storage
        raw = not hashing and is_sparse(self._header(layer))
        with storage.open_read(entry.object, entry.offset, entry.length, sequential=True) as stream:
            context = file_context(layer.owner, entry.path)
            pieces = decode_frame(
                stream.read, entry.length, dek, context, raw=raw, plain_size=entry.payload_size
            )
            if raw:
                yield from _records(pieces, entry.payload_size, f"'{entry.path}'")
            else:
                yield from checked(entry, pieces, hashing)


class _Header:
    """A frame's header, once read, and the lock its first reader holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: bytes | None = None


def _one_chunk(decoded: Iterator[bytes | memoryview | None]) -> Iterator[bytes | memoryview]:
    """The pieces of the next chunk of ``decoded`` (decode_chunks), up to its end marker."""
    for piece in decoded:
        if piece is None:
            return
        yield piece


def _records(pieces: Iterator[bytes], size: int, name: str) -> Iterator[SparsePages]:
    """The sparse-page records in ``pieces``, of ``size`` bytes of plaintext in all."""
    records, seen = SparseStream(), 0
    for piece in pieces:
        for record in records.feed(piece):
            seen += record.size
            yield record
    records.finish()
    if seen != size:
        raise IntegrityError(f"checksum mismatch in {name}")


class LayerPages:
    """The pages of one layer's frame that fall in blocks [first, end) of the file, decoded from
    the chunks that hold them and XORed into windows one after the other (a frame holds its
    blocks in increasing order, so each window takes a prefix of what is left)."""

    def __init__(
        self, layer: Layer, first: int, end: int, reader: LayerReader, hashing: bool
    ) -> None:
        import numpy as np  # only files rebuilt from layers get here

        blocks = layer.frame_blocks
        low, high = int(np.searchsorted(blocks, first)), int(np.searchsorted(blocks, end))
        self._layer = layer
        # the blocks it lays (a file's only, whole, layer has no mask: all of them)
        self._mask = layer.mask if layer.mask is not None else np.ones(len(blocks), dtype=bool)
        self._blocks = blocks[low:high]  # the block of each page to hand out
        self._given = 0  # pages of it handed out so far
        self._pieces: Iterator[bytes | SparsePages] = iter(())
        self._skip = 0  # plaintext bytes before the first page
        if low < high:
            start_byte, end_byte = low * PAGE_SIZE, high * PAGE_SIZE
            self._pieces, start = reader.pieces(layer, hashing, start_byte, end_byte)
            self._skip = low * PAGE_SIZE - start
        self._carry = b""  # the start of a page that a piece cut
        self._batch: _Batch | None = None  # pages not laid yet

    def fill(self, window: np.ndarray, low: int, high: int, row0: int | None = None) -> None:
        """XOR this layer's pages of blocks [low, high) into ``window``, whose row 0 is block
        ``row0`` (default ``low``); pages before ``low`` are passed over. Every page its mask
        selects there must be found."""
        import numpy as np

        row0 = low if row0 is None else row0
        laid = 0
        while True:
            if self._batch is None:
                self._batch = self._next_batch()
            if self._batch is None:
                break
            laid += self._batch.xor_into(window, low, high, row0, self._mask)
            self._batch = self._batch.after(high)
            if self._batch is not None:
                break
        if laid != int(np.count_nonzero(self._mask[low:high])):
            raise IntegrityError(
                f"'{self._layer.entry.path}' in backup '{self._layer.owner}' does not hold the"
                " pages its manifest lists"
            )

    def finish(self) -> None:
        """Decode what is left of the last chunk, so its checks run."""
        for _ in self._pieces:
            pass

    def _next_batch(self) -> _Batch | None:
        import numpy as np

        left = len(self._blocks) - self._given
        if not left:
            return None
        for piece in self._pieces:
            if isinstance(piece, SparsePages):
                return self._take_sparse(piece, left)
            view = memoryview(piece)[self._skip :]
            self._skip -= min(self._skip, len(piece))
            data = self._carry + view if self._carry else view
            count = min(len(data) // PAGE_SIZE, left)
            self._carry = bytes(data[count * PAGE_SIZE :]) if count < left else b""
            if count:
                pages = np.frombuffer(data, np.uint8, count * PAGE_SIZE)
                return _DenseBatch(self._take(count), pages.reshape(count, PAGE_SIZE))
        if not self._carry:
            raise IntegrityError(
                f"'{self._layer.entry.path}' in backup '{self._layer.owner}' holds fewer pages"
                " than its manifest lists"
            )
        last = np.zeros((1, PAGE_SIZE), np.uint8)  # a file's partial last page
        last[0, : len(self._carry)] = np.frombuffer(self._carry, np.uint8)
        self._carry = b""
        return _DenseBatch(self._take(1), last)

    def _take_sparse(self, record: SparsePages, left: int) -> _Batch | None:
        """The pages of a record (a whole chunk) past the ones to skip."""
        skip = self._skip // PAGE_SIZE
        self._skip -= min(self._skip, record.pages * PAGE_SIZE)
        count = min(max(record.pages - skip, 0), left)
        if not count:
            return self._next_batch()
        return _SparseBatch(record, skip, self._take(count))

    def _take(self, count: int) -> np.ndarray:
        blocks = self._blocks[self._given : self._given + count]
        self._given += count
        return blocks


class _Batch(ABC):
    """Pages of a layer, in block order, not laid yet."""

    blocks: np.ndarray

    @abstractmethod
    def xor_into(self, window: np.ndarray, low: int, high: int, row0: int, mask: np.ndarray) -> int:
        """XOR the pages of blocks [low, high) that ``mask`` selects into ``window`` (row 0:
        block ``row0``); how many."""

    @abstractmethod
    def after(self, high: int) -> _Batch | None:
        """The pages of blocks from ``high`` on (None: none left)."""


class _DenseBatch(_Batch):
    def __init__(self, blocks: np.ndarray, pages: np.ndarray) -> None:
        self.blocks, self.pages = blocks, pages

    def xor_into(self, window: np.ndarray, low: int, high: int, row0: int, mask: np.ndarray) -> int:
        import numpy as np

        skip, cut = np.searchsorted(self.blocks, [low, high]).tolist()
        rows, pages = self.blocks[skip:cut], self.pages[skip:cut]
        mine = mask[rows]
        if not mine.all():
            rows, pages = rows[mine], pages[mine]
        if not len(rows):
            return 0
        first = int(rows[0]) - row0
        if int(rows[-1]) - int(rows[0]) + 1 == len(rows):  # consecutive: XORed in place
            target = window[first : first + len(rows)]
            np.bitwise_xor(target, pages, out=target)
        else:
            window[rows - row0] ^= pages
        return len(rows)

    def after(self, high: int) -> _Batch | None:
        import numpy as np

        cut = int(np.searchsorted(self.blocks, high))
        return _DenseBatch(self.blocks[cut:], self.pages[cut:]) if cut < len(self.blocks) else None


class _SparseBatch(_Batch):
    """Pages of a sparse-page record: XORing them in touches only their non-zero words."""

    def __init__(self, record: SparsePages, first: int, blocks: np.ndarray) -> None:
        self.record, self.first = record, first  # its page that holds the first of ``blocks``
        self.blocks = blocks

    def xor_into(self, window: np.ndarray, low: int, high: int, row0: int, mask: np.ndarray) -> int:
        import numpy as np

        skip, cut = np.searchsorted(self.blocks, [low, high]).tolist()
        blocks = self.blocks[skip:cut]
        mine = mask[blocks]
        self.record.xor_into(window, self.first + skip, np.where(mine, blocks - row0, -1))
        return int(np.count_nonzero(mine))

    def after(self, high: int) -> _Batch | None:
        import numpy as np

        cut = int(np.searchsorted(self.blocks, high))
        return (
            _SparseBatch(self.record, self.first + cut, self.blocks[cut:])
            if cut < len(self.blocks)
            else None
        )


class LayerCursor:
    """One layer of a file walked in block order by windows that may leave gaps: a chunk is
    decoded only if a window needs a block of it, then wholly (its checksum checked), once."""

    def __init__(self, layer: Layer, reader: LayerReader) -> None:
        blocks = layer.frame_blocks
        firsts = [chunk[0] // PAGE_SIZE for chunk in layer.entry.chunks or [(0, 0, "")]]
        firsts.append(len(blocks))
        self._layer, self._reader = layer, reader
        # the block range [first, end) of each chunk that holds pages
        self._spans = [
            (int(blocks[a]), int(blocks[b - 1]) + 1) for a, b in itertools.pairwise(firsts) if a < b
        ]
        self._firsts = [first for first, _ in self._spans]
        self._pages: LayerPages | None = None  # of the chunk being walked
        self._chunk = -1

    def fill(self, window: np.ndarray, low: int, high: int) -> None:
        """XOR this layer's pages of blocks [low, high) into ``window`` (row 0: block ``low``);
        windows must come in block order."""
        index = max(bisect_right(self._firsts, low) - 1, 0)
        while index < len(self._spans) and self._spans[index][0] < high:
            first, end = self._spans[index]
            if end > low:
                if index != self._chunk:
                    self.finish()
                    self._pages = LayerPages(self._layer, first, end, self._reader, True)
                    self._chunk = index
                assert self._pages is not None
                self._pages.fill(window, max(low, first), min(high, end), row0=low)
            index += 1

    def finish(self) -> None:
        """Decode the rest of the chunk being walked, so its checks run."""
        if self._pages is not None:
            self._pages.finish()
        self._pages, self._chunk = None, -1


def _naming(layer: Layer, pieces: Iterator[_Piece]) -> Iterator[_Piece]:
    """``pieces``, with an error naming the file and the backup it failed in."""
    try:
        yield from pieces
    except DrkitError as exc:
        raise type(exc)(
            f"unable to restore '{layer.entry.path}' from backup '{layer.owner}': {exc.message}",
            hint=exc.hint or "run 'drkit verify' to list every damaged file",
        ) from None
