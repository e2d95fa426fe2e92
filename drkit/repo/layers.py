"""Read the pages of a file's layers (see chain.py) from a repository, a block range at a time.

Used where a file is rebuilt in memory window by window: a restore writing a large file assembled
from a chain, and a backup storing XOR deltas, which needs its base backup's version of every page
it changed. Every layer's pages of a window are XORed into the window, zeroed first: a layer that
stores pages plainly (the masks of plain layers are disjoint) thus lays them, and an XOR layer
applies its difference to the older version the older layers lay, in any order.
"""

from __future__ import annotations

import hashlib
import itertools
from bisect import bisect_right
from collections.abc import Iterator
from typing import TYPE_CHECKING

from drkit.codec.frame import HEADER_SIZE, chunk_span, decode_chunk, decode_frame, payload_length
from drkit.errors import DrkitError, IntegrityError
from drkit.pg.constants import PAGE_SIZE
from drkit.repo.chain import Layer
from drkit.repo.reader import checked
from drkit.repo.repository import Repository, file_context

if TYPE_CHECKING:
    import numpy as np


class LayerReader:
    """Decodes the frames of one chain's layers from one repository."""

    def __init__(self, repo: Repository, deks: dict[str, bytes]) -> None:
        self.repo = repo
        self._deks = deks

    def chunk_plaintext(self, layer: Layer, index: int, hashing: bool) -> Iterator[bytes]:
        """The plaintext of chunk ``index`` of ``layer``'s frame as it decodes; its size (and
        with ``hashing`` its checksum) checked at its end."""
        entry, storage = layer.entry, self.repo.storage
        chunks = entry.chunks or []
        plain_start, payload_start, sha256 = chunks[index]
        last = index + 1 == len(chunks)
        plain_end = entry.payload_size if last else chunks[index + 1][0]
        header = storage.read_bytes(entry.object, entry.offset, HEADER_SIZE)
        payload_end = payload_length(header, entry.length) if last else chunks[index + 1][1]
        offset, length = chunk_span(header, entry.length, payload_start, payload_end)
        dek, context = self._deks[layer.owner], file_context(layer.owner, entry.path)
        digest, size = hashlib.sha256() if hashing else None, 0
        with storage.open_read(entry.object, entry.offset + offset, length) as stream:
            for piece in decode_chunk(
                header, stream.read, entry.length, dek, context, payload_start, payload_end
            ):
                if digest is not None:
                    digest.update(piece)
                size += len(piece)
                yield piece
        if size != plain_end - plain_start or (digest is not None and digest.hexdigest() != sha256):
            raise IntegrityError(f"checksum mismatch in chunk {index} of '{entry.path}'")

    def plaintext(
        self, layer: Layer, hashing: bool, start: int, end: int
    ) -> tuple[Iterator[bytes], int]:
        """The plaintext of ``layer``'s frame that holds bytes [start, end) of it: from the chunk
        holding byte ``start`` through the one holding byte ``end - 1`` (the whole frame when it
        is not chunked), with the frame byte it begins at."""
        entry = layer.entry
        if not entry.chunks:
            return _naming(layer, self._frame_plaintext(layer, hashing)), 0
        starts = [chunk[0] for chunk in entry.chunks]
        low, high = bisect_right(starts, start) - 1, bisect_right(starts, end - 1)
        pieces = itertools.chain.from_iterable(
            self.chunk_plaintext(layer, index, hashing) for index in range(low, high)
        )
        return _naming(layer, pieces), starts[low]

    def _frame_plaintext(self, layer: Layer, hashing: bool) -> Iterator[bytes]:
        entry, dek = layer.entry, self._deks[layer.owner]
        with self.repo.storage.open_read(entry.object, entry.offset, entry.length) as stream:
            context = file_context(layer.owner, entry.path)
            pieces = decode_frame(stream.read, entry.length, dek, context)
            yield from checked(entry, pieces, hashing)


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
        self._pieces: Iterator[bytes] = iter(())
        self._skip = 0  # plaintext bytes before the first page
        if low < high:
            start_byte, end_byte = low * PAGE_SIZE, high * PAGE_SIZE
            self._pieces, start = reader.plaintext(layer, hashing, start_byte, end_byte)
            self._skip = low * PAGE_SIZE - start
        self._carry = b""  # the start of a page that a piece cut
        self._batch: tuple[np.ndarray, np.ndarray] | None = None  # (blocks, pages) not laid yet

    def fill(self, window: np.ndarray, low: int, high: int, row0: int | None = None) -> None:
        """XOR this layer's pages of blocks [low, high) into ``window``, whose row 0 is block
        ``row0`` (default ``low``); pages before ``low`` are passed over. Every page its mask
        selects there must be found."""
        import numpy as np

        row0 = low if row0 is None else row0
        laid = 0
        while True:
            if self._batch is None and (batch := self._next_batch()) is not None:
                self._batch = batch
            if self._batch is None:
                break
            blocks, pages = self._batch
            skip, cut = np.searchsorted(blocks, [low, high]).tolist()
            laid += _xor_rows(window, blocks[skip:cut] - row0, pages[skip:cut], self._mask,
                              blocks[skip:cut])  # fmt: skip
            if cut < len(blocks):
                self._batch = blocks[cut:], pages[cut:]
                break
            self._batch = None
        if laid != int(np.count_nonzero(self._mask[low:high])):
            raise IntegrityError(
                f"'{self._layer.entry.path}' in backup '{self._layer.owner}' does not hold the"
                " pages its manifest lists"
            )

    def finish(self) -> None:
        """Decode what is left of the last chunk, so its checks run."""
        for _ in self._pieces:
            pass

    def _next_batch(self) -> tuple[np.ndarray, np.ndarray] | None:
        import numpy as np

        left = len(self._blocks) - self._given
        if not left:
            return None
        for piece in self._pieces:
            view = memoryview(piece)[self._skip :]
            self._skip -= min(self._skip, len(piece))
            data = self._carry + view if self._carry else view
            count = min(len(data) // PAGE_SIZE, left)
            self._carry = bytes(data[count * PAGE_SIZE :]) if count < left else b""
            if count:
                return self._take(np.frombuffer(data, np.uint8, count * PAGE_SIZE), count)
        if not self._carry:
            raise IntegrityError(
                f"'{self._layer.entry.path}' in backup '{self._layer.owner}' holds fewer pages"
                " than its manifest lists"
            )
        last = np.zeros(PAGE_SIZE, np.uint8)  # a file's partial last page
        last[: len(self._carry)] = np.frombuffer(self._carry, np.uint8)
        self._carry = b""
        return self._take(last, 1)

    def _take(self, data: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = self._blocks[self._given : self._given + count]
        self._given += count
        return blocks, data.reshape(count, PAGE_SIZE)


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


def _xor_rows(
    window: np.ndarray, rows: np.ndarray, pages: np.ndarray, mask: np.ndarray, blocks: np.ndarray
) -> int:
    """XOR ``pages`` into rows ``rows`` (increasing) of ``window``, those whose block the mask
    selects; how many. A run of consecutive rows, all selected (a whole layer's window, a run
    of changed pages), is XORed in place, without the copies fancy indexing makes."""
    import numpy as np

    mine = mask[blocks]
    if not mine.all():
        rows, pages = rows[mine], pages[mine]
    if not len(rows):
        return 0
    first = int(rows[0])
    if int(rows[-1]) - first + 1 == len(rows):
        target = window[first : first + len(rows)]
        np.bitwise_xor(target, pages, out=target)
    else:
        window[rows] ^= pages
    return len(rows)


def _naming(layer: Layer, pieces: Iterator[bytes]) -> Iterator[bytes]:
    """``pieces``, with an error naming the file and the backup it failed in."""
    try:
        yield from pieces
    except DrkitError as exc:
        raise type(exc)(
            f"unable to restore '{layer.entry.path}' from backup '{layer.owner}': {exc.message}",
            hint=exc.hint or "run 'drkit verify' to list every damaged file",
        ) from None
