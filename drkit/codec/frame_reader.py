"""Decoding frames: decode_frame streams a frame's plaintext out, decode_chunks some chunks of a
chunked frame, unseal() a frame held in memory.

The format, and what its authentication guarantees, is described in drkit/codec/frame.py.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drkit.codec.frame import (
    HEADER_SIZE,
    MAX_SEGMENTS,
    TAG_SIZE,
    check_dek,
    derive_subkey,
    is_sparse,
    parse_header,
    segment_nonce,
)
from drkit.errors import IntegrityError


def decode_frame(
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    *,
    zstd_frames: int = 1,
    raw: bool = False,
    plain_size: int | None = None,
) -> Iterator[bytes]:
    """Reads exactly `length` stored bytes via read(n); yields authenticated, decompressed chunks.

    ``read(n)`` returns up to ``n`` bytes (fewer only at the end of the data, like a file). Chunks
    are at most about 1 MiB, except that given the plaintext's size ``plain_size`` (the manifest
    records it), a frame of one zstd frame and at most WHOLE_LIMIT bytes of plain (not sparse)
    plaintext comes as one piece. Raises IntegrityError (lowercase message, without the object's
    name: the caller adds it) when the frame is damaged, truncated, extended, reordered, spliced,
    not a drkit frame, or sealed under another data key or context. Output is provisional until
    the iterator is exhausted without an error (see the module docstring). A chunked payload
    (FrameWriter with ``chunk_size``) holds ``zstd_frames`` zstd frames back to back. A frame of
    sparse pages yields its plaintext expanded, or with ``raw`` its records as stored.
    """
    check_dek(dek)
    if length < HEADER_SIZE + TAG_SIZE:
        raise IntegrityError(
            f"frame is truncated: {length} bytes is less than the smallest frame "
            f"({HEADER_SIZE + TAG_SIZE} bytes)"
        )
    header = _read_exactly(read, HEADER_SIZE)
    whole = plain_size if zstd_frames == 1 and _fits_whole(plain_size) else None
    pieces = _frame_payload(read, length, dek, context, zstd_frames, header, whole)
    if raw or not is_sparse(header):
        yield from pieces
    else:
        from drkit.codec.sparse_pages import expand  # numpy: not for wal-fetch

        yield from expand(pieces)


def _frame_payload(
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    zstd_frames: int,
    header: bytes,
    whole: int | None,
) -> Iterator[bytes]:
    """The frame's payload, decompressed; with ``whole`` (its plaintext size), a compressed
    frame of plain pages in one call (see WHOLE_LIMIT)."""
    segment_size, compressed, nonce_prefix, salt, sparse = parse_header(header)
    stored_segment = segment_size + TAG_SIZE
    body = length - HEADER_SIZE
    count = max(1, -(-body // stored_segment))
    last_size = body - (count - 1) * stored_segment
    if last_size < TAG_SIZE:
        raise IntegrityError(
            f"frame length does not fit its segments: the last segment would be {last_size} bytes, "
            f"less than its {TAG_SIZE}-byte tag (the frame was truncated or extended)"
        )
    if count > MAX_SEGMENTS:
        raise IntegrityError(f"frame length {length} exceeds the largest possible frame")

    aead = AESGCM(derive_subkey(dek, salt, context))
    if whole is not None and compressed and not sparse:
        parts = [
            _open_segment(aead, nonce_prefix, header, index, count, sealed)
            for index, sealed in enumerate(_segments(read, count, stored_segment, last_size))
        ]
        if plaintext := _decompress_whole(_joined(parts), whole):
            yield plaintext
        return
    stream = _ZstdStream(zstd_frames) if compressed else None
    for index, sealed in enumerate(_segments(read, count, stored_segment, last_size)):
        payload = _open_segment(aead, nonce_prefix, header, index, count, sealed)
        if stream is None:
            if payload:
                yield payload
        else:
            yield from stream.feed(memoryview(payload))
    if stream is not None:
        stream.finish()


def _segments(
    read: Callable[[int], bytes], count: int, stored_segment: int, last_size: int
) -> Iterator[bytes]:
    """The ``count`` sealed segments of a frame's body, as read."""
    for index in range(count):
        yield _read_exactly(read, last_size if index == count - 1 else stored_segment)


def decode_chunks(
    header: bytes,
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    bounds: list[int],
    sizes: Sequence[int] | None = None,
    *,
    reuse: bool = False,
) -> Iterator[bytes | memoryview | None]:
    """Decodes consecutive chunks of a chunked frame of ``length`` stored bytes in one pass:
    chunk ``i`` is payload bytes [bounds[i], bounds[i + 1]), and ``read`` returns the stored
    bytes from chunk_span(bounds[0], bounds[-1])'s offset on. Every segment read is
    authenticated (the last segment of the frame with its last-segment flag) and decrypted once,
    also one that two chunks share; each chunk's payload must be exactly one complete zstd
    frame. Yields each chunk's pieces, then None once its zstd frame is checked complete. The
    caller checks each chunk's plaintext checksum, and expands a frame of sparse pages
    (is_sparse): its chunks are yielded as the records stored. Given each chunk's plaintext size
    in ``sizes`` (the manifest records them), chunks of plain pages of at most WHOLE_LIMIT bytes
    are decompressed in one call each and come as one piece; with ``reuse``, that piece is a
    view of this thread's output buffer (page-aligned, so it can be written with O_DIRECT),
    valid only until the thread decodes its next chunk, and the stored segments are decrypted
    in place into the thread's buffer for them: a thread runs one such decode at a time."""
    check_dek(dek)
    segment_size, compressed, nonce_prefix, salt, sparse = parse_header(header)
    if not compressed:
        raise IntegrityError("frame is not compressed, so it has no chunks")
    stored_segment = segment_size + TAG_SIZE
    body = length - HEADER_SIZE
    count = max(1, -(-body // stored_segment))
    last_size = body - (count - 1) * stored_segment
    aead = AESGCM(derive_subkey(dek, salt, context))
    start, end = bounds[0], bounds[-1]
    first, last = start // segment_size, max(end - 1, start) // segment_size
    if last >= count or last_size < TAG_SIZE:
        raise IntegrityError("frame chunk lies outside the frame (the frame was truncated)")
    whole = sizes is not None and not sparse and all(_fits_whole(size) for size in sizes)
    chunk, stream = 0, None if whole else _ZstdStream()
    parts: list[memoryview] = []  # decoding whole: the current chunk's payload so far
    # reusing buffers: the current chunk's payload gathers in this thread's buffer instead
    held = _held(max(b - a for a, b in pairwise(bounds))) if reuse and whole else None
    for index in range(first, last + 1):
        final = index == count - 1
        sealed = _read_exactly(read, last_size if final else stored_segment)
        base = index * segment_size
        plain = len(sealed) - TAG_SIZE
        payload: memoryview | None = None  # None: decrypted in place, into ``held``
        if held is not None and bounds[chunk] <= base <= base + plain <= bounds[chunk + 1]:
            at = base - bounds[chunk]
            _open_segment(aead, nonce_prefix, header, index, count, sealed, held[at : at + plain])
        else:
            payload = memoryview(_open_segment(aead, nonce_prefix, header, index, count, sealed))
        low, high = max(start, base), min(end, base + plain)
        while low < high:  # this segment's part of each chunk in turn
            cut = min(bounds[chunk + 1], high)
            if stream is not None:
                assert payload is not None
                yield from stream.feed(payload[low - base : cut - base])
            elif held is not None and payload is not None:
                held[low - bounds[chunk] : cut - bounds[chunk]] = payload[low - base : cut - base]
            elif payload is not None:
                parts.append(payload[low - base : cut - base])
            low = cut
            if cut == bounds[chunk + 1]:
                if stream is None:
                    assert sizes is not None
                    if held is not None:
                        plaintext: bytes | memoryview = _decompress_into(
                            held[: bounds[chunk + 1] - bounds[chunk]], sizes[chunk]
                        )
                    else:
                        plaintext = _decompress_whole(_joined(parts), sizes[chunk])
                    if plaintext:
                        yield plaintext
                    parts = []
                else:
                    stream.finish()
                    stream = _ZstdStream()
                yield None
                chunk += 1
    if chunk < len(bounds) - 1:  # the stored segments ended inside a chunk (or it is empty)
        if stream is not None:
            stream.finish()
        raise IntegrityError("frame is truncated: a chunk ends past its stored segments")


def _open_segment(
    aead: AESGCM,
    nonce_prefix: bytes,
    header: bytes,
    index: int,
    count: int,
    sealed: bytes,
    into: memoryview | None = None,
) -> bytes:
    """Authenticate and decrypt segment ``index`` of ``count`` (the last one with its flag);
    ``into`` (of the plaintext's size) receives it instead of a new bytes object."""
    nonce = segment_nonce(nonce_prefix, index, index == count - 1)
    try:
        if into is None:
            return aead.decrypt(nonce, sealed, header)
        aead.decrypt_into(nonce, sealed, header, into)
        return b""
    except InvalidTag:
        raise IntegrityError(
            f"frame segment {index} of {count} failed authentication: the data is damaged, "
            "truncated or reordered, or it was sealed with another data key or context"
        ) from None


def unseal(blob: bytes, dek: bytes, context: bytes) -> bytes:
    """Decodes a frame held whole in memory; raises IntegrityError like decode_frame()."""
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = blob[position : position + size]
        position += len(chunk)
        return chunk

    return b"".join(decode_frame(read, len(blob), dek, context))


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    chunk = read(size)
    if len(chunk) == size:
        return chunk
    if len(chunk) > size:
        raise ValueError(f"read({size}) returned {len(chunk)} bytes")
    parts = bytearray(chunk)
    while len(parts) < size:
        more = read(size - len(parts))
        if not more:
            raise IntegrityError(
                f"frame is truncated: the stored data ended {size - len(parts)} bytes early"
            )
        if len(more) > size - len(parts):
            raise ValueError(f"read({size - len(parts)}) returned {len(more)} bytes")
        parts += more
    return bytes(parts)


# A frame (or chunk) of plain pages whose plaintext size the caller gives and is at most this is
# decompressed in one call, into one buffer of that size, instead of through _ZstdStream: no
# Python per zstd block, and no copy through a 128 KiB output buffer into a growing result (a
# chunk, whose zstd frame records its size, even decodes straight into its buffer). Memory stays
# bounded: the size comes from the authenticated manifest, never from the data, and large files
# are stored in chunks of 16 MiB (backup.chunk_size).
WHOLE_LIMIT = 32 * 1024 * 1024

# Each thread keeps one decompression context for whole decodes: a new one per frame costs an
# allocation of its buffers (megabytes, for zstd's window), which a restore of many small files
# would pay per file. Only whole decodes use it: they finish within one call, so no two decodes
# of one thread ever share it.
_contexts = threading.local()


def _fits_whole(size: int | None) -> bool:
    return size is not None and 0 < size <= WHOLE_LIMIT


def _decompress_whole(payload: bytes | memoryview, size: int) -> bytes:
    """The plaintext of ``payload``, one complete zstd frame of ``size`` bytes of plaintext, with
    nothing after it."""
    _check_header(payload, size)
    try:
        return _decompressor().decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        if "unused data" in str(exc):
            raise IntegrityError(
                "compressed payload has trailing data after the end of its zstd stream"
            ) from None
        raise _corrupt(exc, size) from None


def _decompress_into(payload: memoryview, size: int) -> memoryview:
    """_decompress_whole's plaintext, decoded straight into this thread's output buffer (zstd
    decodes a frame in one pass into a buffer that holds its recorded size): no allocation and
    no page faults per chunk. The same checks: one zstd frame of exactly ``size`` bytes, nothing
    after it."""
    _check_header(payload, size)
    stored = _frame_size(payload)
    if stored > len(payload):
        raise IntegrityError("compressed payload is truncated: the zstd stream has no end")
    if stored < len(payload):
        raise IntegrityError(
            "compressed payload has trailing data after the end of its zstd stream"
        )
    output = _output(size)
    try:
        reader = _decompressor().stream_reader(payload, read_across_frames=False)
        filled = 0
        while filled < size and (got := reader.readinto(output[filled:])):
            filled += got
        longer = filled == size and reader.read(1)
    except zstandard.ZstdError as exc:
        raise _corrupt(exc, size) from None
    if filled != size or longer:
        raise IntegrityError(
            f"compressed payload is corrupt, truncated or longer than the {size} bytes recorded"
        )
    return output


def _check_header(payload: bytes | memoryview, size: int) -> None:
    """Check that ``payload`` begins a zstd frame that does not declare a size other than
    ``size``."""
    head = bytes(payload[: len(_ZSTD_MAGIC)])
    if head != _ZSTD_MAGIC[: len(head)]:
        raise IntegrityError("compressed payload is not a zstd frame")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError:  # the frame's header is incomplete
        raise IntegrityError(
            "compressed payload is truncated: the zstd stream has no end"
        ) from None
    if declared not in (-1, size):
        raise IntegrityError(
            f"compressed payload holds {declared} bytes of plaintext, not the {size} recorded"
        )


def _corrupt(exc: zstandard.ZstdError, size: int) -> IntegrityError:
    return IntegrityError(
        f"compressed payload is corrupt, truncated or longer than the {size} bytes recorded: {exc}"
    )


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_contexts, "decompressor", None)
    if decompressor is None:
        decompressor = _contexts.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _output(size: int) -> memoryview:
    """This thread's output buffer, its first ``size`` bytes: a private anonymous mapping (so
    page-aligned; a shared one is shmem, whose pages cost more to fault in), kept for the
    thread's next chunks; it grows to the largest chunk asked."""
    buffer = getattr(_contexts, "output", None)
    if buffer is None or len(buffer) < size:
        buffer = _contexts.output = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(buffer)[:size]


def _joined(parts: Sequence[bytes | memoryview]) -> bytes | memoryview:
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _held(size: int) -> memoryview:
    """This thread's buffer for a chunk's stored payload, at least ``size`` bytes."""
    buffer = getattr(_contexts, "held", None)
    if buffer is None or len(buffer) < size:
        buffer = _contexts.held = bytearray(size)
    return memoryview(buffer)


def _frame_size(payload: bytes | memoryview) -> int:
    """The stored size of the zstd frame that begins ``payload`` (its header, blocks and
    checksum, found from the block headers alone); past ``len(payload)`` when it is cut short."""
    view = memoryview(payload)
    if len(view) < _ZSTD_FRAME_START:
        return len(view) + 1
    descriptor = view[4]
    single_segment = bool(descriptor & 0x20)
    position = (
        _ZSTD_FRAME_START
        + (0 if single_segment else 1)
        + (0, 1, 2, 4)[descriptor & 0x03]
        + (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    )
    end = len(view)
    while position + _ZSTD_BLOCK_HEADER <= end:
        value = int.from_bytes(view[position : position + _ZSTD_BLOCK_HEADER], "little")
        position += _ZSTD_BLOCK_HEADER + (1 if (value >> 1) & 3 == _ZSTD_BLOCK_RLE else value >> 3)
        if value & 1:  # the last block
            return position + (_ZSTD_CHECKSUM if descriptor & 0x04 else 0)
    return end + 1


# zstd frame structure (RFC 8878), as far as needed to find block boundaries and the frame's end.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_FRAME_START = 5  # magic + frame header descriptor
_ZSTD_BLOCK_HEADER = 3
_ZSTD_BLOCK_RLE = 1
_ZSTD_BLOCK_RESERVED = 3
_ZSTD_CHECKSUM = 4
# A zstd block decodes to at most 128 KiB (but an RLE block takes only 4 bytes to store), so the
# input handed to the decompressor at once holds at most this many block headers: that is what
# bounds the memory of decoding a highly compressible frame (a GiB of zeros is ~32 KiB of zstd).
_BLOCKS_PER_CALL = 8

_FRAME_START, _FRAME_HEADER_REST, _BLOCK_HEADER, _END = range(4)


class _ZstdStream:
    """Decompresses zstd frames fed in arbitrary pieces, in bounded memory, checking the end.

    python-zstandard's decompressobj returns all output of the input it is given at once, and its
    streaming readers end silently on a truncated frame. So this walks the frame's structure
    (headers only: per block, not per byte) beside the decompressor, cutting the input after at
    most ``_BLOCKS_PER_CALL`` blocks, and knows exactly where the frame ends: a missing end or
    trailing data is reported, not ignored.
    """

    def __init__(self, frames: int = 1) -> None:
        self._frames = frames  # zstd frames expected back to back (a chunked payload has several)
        self._done = 0
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._state = _FRAME_START
        self._need = _ZSTD_FRAME_START  # bytes of the structure being parsed
        self._parsed = bytearray()  # the structure's bytes seen so far
        self._skip = 0  # bytes of block content (and final checksum) still to pass through
        self._checksum = False

    def feed(self, data: memoryview) -> Iterator[bytes]:
        end = len(data)
        position = cut = blocks = 0
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                position += step
                self._skip -= step
                continue
            if self._state == _END:
                yield from self._decompress(data[cut:position])
                self._next_frame()
                cut, blocks = position, 0
                continue
            step = min(self._need - len(self._parsed), end - position)
            self._parsed += data[position : position + step]
            position += step
            if len(self._parsed) == self._need:
                if self._advance():
                    blocks += 1
                if blocks == _BLOCKS_PER_CALL:
                    yield from self._decompress(data[cut:position])
                    cut, blocks = position, 0
        yield from self._decompress(data[cut:end])

    def finish(self) -> None:
        if self._state != _END or self._skip or not self._decompressor.eof:
            raise IntegrityError("compressed payload is truncated: the zstd stream has no end")
        if self._done + 1 != self._frames:
            raise IntegrityError(
                f"compressed payload is truncated: {self._done + 1} of {self._frames} zstd frames"
            )

    def _next_frame(self) -> None:
        """The current zstd frame ended and more payload follows: the next frame, if expected."""
        self._done += 1
        if self._done >= self._frames or not self._decompressor.eof:
            raise IntegrityError(
                "compressed payload has trailing data after the end of its zstd stream"
            )
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._state, self._need = _FRAME_START, _ZSTD_FRAME_START

    def _decompress(self, data: memoryview) -> Iterator[bytes]:
        if not data:
            return
        try:
            output = self._decompressor.decompress(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"compressed payload is corrupt: {exc}") from None
        if output:
            yield output

    def _advance(self) -> bool:
        """Interprets the structure just parsed; returns whether it was a block header."""
        parsed = bytes(self._parsed)
        self._parsed.clear()
        if self._state == _BLOCK_HEADER:
            value = int.from_bytes(parsed, "little")
            block_type = (value >> 1) & 3
            if block_type == _ZSTD_BLOCK_RESERVED:
                raise IntegrityError("compressed payload is corrupt: reserved zstd block type")
            self._skip = 1 if block_type == _ZSTD_BLOCK_RLE else value >> 3
            if value & 1:  # last block
                self._skip += _ZSTD_CHECKSUM if self._checksum else 0
                self._state = _END
            self._need = _ZSTD_BLOCK_HEADER
            return True
        if self._state == _FRAME_START:
            if parsed[:4] != _ZSTD_MAGIC:
                raise IntegrityError("compressed payload is not a zstd frame")
            descriptor = parsed[4]
            if descriptor & 0x08:
                raise IntegrityError("compressed payload is corrupt: reserved zstd header bit set")
            single_segment = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            content_size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
            rest = (
                (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03] + content_size_bytes
            )
            if rest:
                self._state, self._need = _FRAME_HEADER_REST, rest
                return False
        self._state, self._need = _BLOCK_HEADER, _ZSTD_BLOCK_HEADER
        return False
