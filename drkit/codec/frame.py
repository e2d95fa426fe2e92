"""Frames: independently decodable, compressed, authenticated byte streams.

A frame carries one logical object (a file of PGDATA, a WAL segment, a manifest). It is written as
it is read, in bounded memory, and decoded the same way; a ranged read of one frame inside a bundle
restores one file.

Layout (big-endian)::

    off len field
    0   4   magic b"DKF1"
    4   1   version = 1
    5   1   flags: bit0 = payload is zstd-compressed; bit1 = sparse pages (with bit0: each zstd
            frame of the payload holds its plaintext as sparse-page records, sparse_pages.py);
            other bits must be 0
    6   2   reserved = 0
    8   4   segment_size S (plaintext bytes per segment, 1 KiB .. 16 MiB)
    12  32  salt (random per frame)
    44  7   nonce_prefix (random per frame)
    51  ..  segments: AES-256-GCM(payload[i*S:(i+1)*S]) || tag, i = 0 .. n-1

The payload (the zstd stream, or the raw input) is cut into segments of exactly S bytes except the
last, which holds 0..S bytes (an empty payload is one empty last segment). Each frame has its own
key, ``HKDF-SHA256(ikm=DEK, salt=salt, info=b"drkit-frame-v1\\0" + context)``, and segment i is
sealed with the nonce ``nonce_prefix || i (u32) || last (0x01 on the final segment, else 0x00)``
(the STREAM construction of Tink's streaming AEAD and age). The caller's ``context`` names the
frame's logical identity (e.g. ``b"backup:20261126-010000F:base/5/1259"``), so a frame cannot be
swapped for another. The decoder is told the frame's stored length (the manifest records it), so it
knows where the segments end and which one is last.

Why compress, then encrypt: ciphertext is indistinguishable from random and does not compress, so
compression must come first to gain anything. The plaintext checksum is taken before both, so it
names the original bytes whatever the codec settings were. The price is that stored sizes reveal
how well the content compressed, which whoever can list the repository sees; like borg, restic and
pgBackRest, drkit accepts that.

Why the header is the associated data of every segment: the header is stored in clear (the decoder
needs the salt and segment size before it has a key), so it must not be trusted until authenticated.
Binding it to every segment means a flipped compression flag, a changed segment size or a salt and
nonce prefix borrowed from another frame fails authentication like damage to the data itself.

What authentication gives: a wrong data key, a wrong context (a frame moved to another file's
place), bit flips, truncation, extension, reordering and splicing all raise IntegrityError. Each
segment is authenticated before any of its plaintext is released; plaintext from earlier segments is
released before later ones are checked, so a consumer must treat the output as provisional until
decoding finished without an error (restore writes to a temporary name and renames at the end).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drkit.errors import IntegrityError

MAGIC = b"DKF1"
VERSION = 1
FLAG_ZSTD = 0x01
FLAG_SPARSE = 0x02
HEADER_SIZE = 51
TAG_SIZE = 16
DEK_SIZE = 32
DEFAULT_SEGMENT_SIZE = 256 * 1024
MIN_SEGMENT_SIZE = 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
MAX_SEGMENTS = 2**32  # the segment counter in the nonce is a u32

_HEADER = struct.Struct(">4sBBHI32s7s")
_NONCE_TAIL = struct.Struct(">IB")
_SALT_SIZE = 32
_NONCE_PREFIX_SIZE = 7
_HKDF_INFO = b"drkit-frame-v1\x00"

# Input is handed to the compressor in slices of this size, so one large write() cannot make the
# compressor return (and the writer hold) an equally large output.
_COMPRESS_SLICE = 1024 * 1024

assert _HEADER.size == HEADER_SIZE


@dataclass(frozen=True)
class Chunk:
    """An independently decompressible part of a chunked frame's plaintext (see FrameWriter)."""

    plain_offset: int  # where its plaintext starts in the input
    payload_offset: int  # where its zstd frame starts in the (compressed) payload
    plain_sha256: str  # of its plaintext


@dataclass(frozen=True)
class FrameInfo:
    """What a finished frame holds; the manifest records all of it."""

    plain_size: int  # bytes of original (uncompressed) input
    plain_sha256: str  # hex sha256 of the original input
    stored_size: int  # bytes written to the sink (header + segments)
    chunks: tuple[Chunk, ...] = ()  # with chunk_size: where each chunk starts


class FrameWriter:
    """Streams plaintext in: sha256 of plaintext -> zstd (level) -> AEAD segments -> sink(bytes).

    ``sink`` is called with the header, then with each sealed segment, in order; it receives
    immutable ``bytes`` it may keep. Memory stays at about two segments plus the zstd context,
    whatever the input size and however it is split into write() calls. If the sink raises, the
    frame is incomplete (it has no last segment, so it can never authenticate) and the writer must
    be discarded.
    """

    def __init__(
        self,
        sink: Callable[[bytes], object],
        dek: bytes,
        context: bytes,
        *,
        compress_level: int | None = 3,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        compress_threads: int = 0,
        chunk_size: int | None = None,
        sparse_pages: bool = False,
    ) -> None:
        """``chunk_size`` (with compression) compresses every ``chunk_size`` bytes of input as a
        zstd frame of its own, on ``compress_threads`` threads: the payload is then a series of
        zstd frames whose offsets FrameInfo.chunks records, so a reader can decode the chunks
        of one large file in parallel too (decode_chunks). The frame format is unchanged;
        decode_frame reads it whole. ``sparse_pages`` (XOR deltas: pages that are mostly zeros;
        needs ``chunk_size``) stores each chunk as a sparse-page record (codec/sparse_pages.py)."""
        _check_dek(dek)
        if sparse_pages and (chunk_size is None or compress_level is None):
            raise ValueError("sparse pages are stored in compressed chunks")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(
                f"segment size {segment_size} is outside {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}"
            )
        self._sink = sink
        self._segment_size = segment_size
        flags = (FLAG_ZSTD if compress_level is not None else 0) | (FLAG_SPARSE * sparse_pages)
        self._sparse = sparse_pages
        salt = os.urandom(_SALT_SIZE)
        self._nonce_prefix = os.urandom(_NONCE_PREFIX_SIZE)
        self._header = _HEADER.pack(
            MAGIC, VERSION, flags, 0, segment_size, salt, self._nonce_prefix
        )
        self._aead = AESGCM(_derive_subkey(dek, salt, context))
        self._level = compress_level
        self._chunk_size = chunk_size if compress_level is not None else None
        self._compressor = (
            zstandard.ZstdCompressor(level=compress_level).compressobj()
            if compress_level is not None and self._chunk_size is None
            else None
        )
        self._chunks: list[Chunk] = []
        self._buffer = bytearray()  # plaintext of the chunk being gathered
        self._chunked = 0  # plaintext bytes handed to the pool so far
        self._queued: deque[tuple[int, Future[tuple[bytes, str]]]] = deque()
        self._workers = max(1, compress_threads)
        self._pool: ThreadPoolExecutor | None = None  # started by a second chunk
        self._payload_size = 0
        self._sha256 = hashlib.sha256()
        self._plain_size = 0
        self._pending = bytearray()  # payload not yet sealed; never more than one segment
        self._index = 0
        self._closed = False
        self._sink(self._header)
        self._stored_size = HEADER_SIZE

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Adds plaintext to the frame; ``data`` is not referenced after this returns."""
        if self._closed:
            raise ValueError("frame writer is closed")
        view = memoryview(data).cast("B")
        self._sha256.update(view)
        self._plain_size += len(view)
        if self._chunk_size is not None:
            while len(view):
                room = self._chunk_size - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
                if len(self._buffer) == self._chunk_size:
                    self._submit_chunk()
            return
        if self._compressor is None:
            self._push(view)
            return
        for start in range(0, len(view), _COMPRESS_SLICE):
            compressed = self._compressor.compress(view[start : start + _COMPRESS_SLICE])
            if compressed:
                self._push(memoryview(compressed))

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """On an error inside the block, abort: the compression threads end with it."""
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Gives the frame up (an error happened while writing it): chunks not yet compressed
        are dropped and the compression threads end. Nothing more reaches the sink; the frame
        cannot be closed afterwards. Safe to call more than once."""
        self._closed = True
        self._queued.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def cut(self) -> None:
        """End the chunk being gathered here (chunked frames; nothing if it is empty): what is
        written next starts a new chunk."""
        if self._chunk_size is not None and self._buffer:
            self._submit_chunk()

    def _submit_chunk(self) -> None:
        """Compress the gathered chunk on the pool; emit finished chunks in order, keeping at
        most one chunk per worker in flight (memory: workers + 1 chunks)."""
        assert self._level is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="zstd")
        start = self._chunked
        data, self._buffer = bytes(self._buffer), bytearray()
        self._chunked += len(data)
        job = self._pool.submit(_compress_chunk, self._level, data, self._sparse)
        self._queued.append((start, job))
        while len(self._queued) > self._workers:
            self._emit_chunk()

    def _emit_chunk(self) -> None:
        start, future = self._queued.popleft()
        compressed, sha256 = future.result()
        self._chunks.append(Chunk(start, self._payload_size, sha256))
        self._push(memoryview(compressed))

    def close(self) -> FrameInfo:
        """Flushes the compressor, writes the last segment and returns what the frame holds."""
        if self._closed:
            raise ValueError("frame writer is closed")
        self._closed = True
        if self._compressor is not None:
            self._push(memoryview(self._compressor.flush()))
        if self._chunk_size is not None and self._pool is None:
            # one chunk in all (a file no larger than a chunk): compressed here, no pool
            assert self._level is not None
            compressed, sha256 = _compress_chunk(self._level, bytes(self._buffer), self._sparse)
            self._chunks.append(Chunk(0, 0, sha256))
            self._push(memoryview(compressed))
        elif self._pool is not None:
            try:
                if self._buffer:
                    self._submit_chunk()
                while self._queued:
                    self._emit_chunk()
            finally:
                self.abort()  # nothing is queued any more on success: the threads just end
        self._seal(self._pending, last=True)
        self._pending = bytearray()
        return FrameInfo(
            plain_size=self._plain_size,
            plain_sha256=self._sha256.hexdigest(),
            stored_size=self._stored_size,
            chunks=tuple(self._chunks),
        )

    def _push(self, payload: memoryview) -> None:
        """Seals every segment that is known not to be the last one.

        A segment is sealed only once at least one payload byte follows it, because the last
        segment carries a different nonce; so up to a full segment waits in ``_pending``.
        Full segments inside a large payload are sealed straight from it, without a copy.
        """
        self._payload_size += len(payload)
        size = self._segment_size
        offset = 0
        if self._pending:
            if len(self._pending) + len(payload) <= size:
                self._pending += payload
                return
            offset = size - len(self._pending)
            self._pending += payload[:offset]
            self._seal(self._pending, last=False)
            self._pending = bytearray()
        while len(payload) - offset > size:
            self._seal(payload[offset : offset + size], last=False)
            offset += size
        self._pending += payload[offset:]

    def _seal(self, segment: bytearray | memoryview, *, last: bool) -> None:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("frame exceeds 2**32 segments; use a larger segment size")
        nonce = self._nonce_prefix + _NONCE_TAIL.pack(self._index, last)
        sealed = self._aead.encrypt(nonce, segment, self._header)
        self._index += 1
        self._stored_size += len(sealed)
        self._sink(sealed)


def decode_frame(
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    *,
    zstd_frames: int = 1,
    raw: bool = False,
) -> Iterator[bytes]:
    """Reads exactly `length` stored bytes via read(n); yields authenticated, decompressed chunks.

    ``read(n)`` returns up to ``n`` bytes (fewer only at the end of the data, like a file). Chunks
    are at most about 1 MiB. Raises IntegrityError (lowercase message, without the object's name:
    the caller adds it) when the frame is damaged, truncated, extended, reordered, spliced, not a
    drkit frame, or sealed under another data key or context. Output is provisional until the
    iterator is exhausted without an error (see the module docstring). A chunked payload
    (FrameWriter with ``chunk_size``) holds ``zstd_frames`` zstd frames back to back. A frame of
    sparse pages yields its plaintext expanded, or with ``raw`` its records as stored.
    """
    _check_dek(dek)
    if length < HEADER_SIZE + TAG_SIZE:
        raise IntegrityError(
            f"frame is truncated: {length} bytes is less than the smallest frame "
            f"({HEADER_SIZE + TAG_SIZE} bytes)"
        )
    header = _read_exactly(read, HEADER_SIZE)
    pieces = _frame_payload(read, length, dek, context, zstd_frames, header)
    if raw or not is_sparse(header):
        yield from pieces
    else:
        from drkit.codec.sparse_pages import expand  # numpy: not for wal-fetch

        yield from expand(pieces)


def is_sparse(header: bytes) -> bool:
    """Whether the frame with this header holds sparse-page records (see FrameWriter)."""
    return _parse_header(header).sparse


def _frame_payload(
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    zstd_frames: int,
    header: bytes,
) -> Iterator[bytes]:
    segment_size, compressed, nonce_prefix, salt, _ = _parse_header(header)
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

    aead = AESGCM(_derive_subkey(dek, salt, context))
    stream = _ZstdStream(zstd_frames) if compressed else None
    for index in range(count):
        last = index == count - 1
        sealed = _read_exactly(read, last_size if last else stored_segment)
        payload = _open_segment(aead, nonce_prefix, header, index, count, sealed)
        if stream is None:
            if payload:
                yield payload
        else:
            yield from stream.feed(memoryview(payload))
    if stream is not None:
        stream.finish()


def payload_length(header: bytes, length: int) -> int:
    """Bytes of payload in a frame of ``length`` stored bytes (the end of its last chunk)."""
    stored_segment = _parse_header(header)[0] + TAG_SIZE
    body = length - HEADER_SIZE
    return body - max(1, -(-body // stored_segment)) * TAG_SIZE


def chunk_span(header: bytes, length: int, payload_start: int, payload_end: int) -> tuple[int, int]:
    """(offset, length) within the frame of the stored segments that hold payload bytes
    ``payload_start`` to ``payload_end`` (one chunk of a chunked frame)."""
    segment_size = _parse_header(header)[0]
    stored_segment = segment_size + TAG_SIZE
    first, last = payload_start // segment_size, max(payload_end - 1, payload_start) // segment_size
    start = HEADER_SIZE + first * stored_segment
    end = min(HEADER_SIZE + (last + 1) * stored_segment, length)
    return start, end - start


def decode_chunks(
    header: bytes,
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    bounds: list[int],
) -> Iterator[bytes | None]:
    """Decodes consecutive chunks of a chunked frame of ``length`` stored bytes in one pass:
    chunk ``i`` is payload bytes [bounds[i], bounds[i + 1]), and ``read`` returns the stored
    bytes from chunk_span(bounds[0], bounds[-1])'s offset on. Every segment read is
    authenticated (the last segment of the frame with its last-segment flag) and decrypted once,
    also one that two chunks share; each chunk's payload must be exactly one complete zstd
    frame. Yields each chunk's pieces, then None once its zstd frame is checked complete. The
    caller checks each chunk's plaintext checksum, and expands a frame of sparse pages
    (is_sparse): its chunks are yielded as the records stored."""
    _check_dek(dek)
    segment_size, compressed, nonce_prefix, salt, _ = _parse_header(header)
    if not compressed:
        raise IntegrityError("frame is not compressed, so it has no chunks")
    stored_segment = segment_size + TAG_SIZE
    body = length - HEADER_SIZE
    count = max(1, -(-body // stored_segment))
    last_size = body - (count - 1) * stored_segment
    aead = AESGCM(_derive_subkey(dek, salt, context))
    start, end = bounds[0], bounds[-1]
    first, last = start // segment_size, max(end - 1, start) // segment_size
    if last >= count or last_size < TAG_SIZE:
        raise IntegrityError("frame chunk lies outside the frame (the frame was truncated)")
    chunk, stream = 0, _ZstdStream()
    for index in range(first, last + 1):
        final = index == count - 1
        sealed = _read_exactly(read, last_size if final else stored_segment)
        payload = memoryview(_open_segment(aead, nonce_prefix, header, index, count, sealed))
        base = index * segment_size
        low, high = max(start, base), min(end, base + len(payload))
        while low < high:  # this segment's part of each chunk in turn
            cut = min(bounds[chunk + 1], high)
            yield from stream.feed(payload[low - base : cut - base])
            low = cut
            if cut == bounds[chunk + 1]:
                stream.finish()
                yield None
                chunk, stream = chunk + 1, _ZstdStream()
    if chunk < len(bounds) - 1:  # the stored segments ended inside a chunk (or it is empty)
        stream.finish()
        raise IntegrityError("frame is truncated: a chunk ends past its stored segments")


def _open_segment(
    aead: AESGCM, nonce_prefix: bytes, header: bytes, index: int, count: int, sealed: bytes
) -> bytes:
    """Authenticate and decrypt segment ``index`` of ``count`` (the last one with its flag)."""
    nonce = nonce_prefix + _NONCE_TAIL.pack(index, index == count - 1)
    try:
        return aead.decrypt(nonce, sealed, header)
    except InvalidTag:
        raise IntegrityError(
            f"frame segment {index} of {count} failed authentication: the data is damaged, "
            "truncated or reordered, or it was sealed with another data key or context"
        ) from None


def seal(data: bytes, dek: bytes, context: bytes, compress_level: int | None = 3) -> bytes:
    """Encodes ``data`` as one frame in memory (manifests, key records)."""
    parts: list[bytes] = []
    writer = FrameWriter(parts.append, dek, context, compress_level=compress_level)
    writer.write(data)
    writer.close()
    return b"".join(parts)


def unseal(blob: bytes, dek: bytes, context: bytes) -> bytes:
    """Decodes a frame held whole in memory; raises IntegrityError like decode_frame()."""
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = blob[position : position + size]
        position += len(chunk)
        return chunk

    return b"".join(decode_frame(read, len(blob), dek, context))


def _compress_chunk(level: int, data: bytes, sparse: bool) -> tuple[bytes, str]:
    """One chunk as one zstd frame (of its sparse-page record), and its checksum (both release
    the GIL)."""
    payload = data
    if sparse:
        from drkit.codec.sparse_pages import encode  # numpy: only for XOR deltas

        payload = encode(data)
    return zstandard.ZstdCompressor(level=level).compress(payload), hashlib.sha256(data).hexdigest()


def _check_dek(dek: bytes) -> None:
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a data key is {DEK_SIZE} bytes, got {len(dek)}")


def _derive_subkey(dek: bytes, salt: bytes, context: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO + context)
    return hkdf.derive(dek)


class _Header(NamedTuple):
    segment_size: int
    compressed: bool
    nonce_prefix: bytes
    salt: bytes
    sparse: bool


def _parse_header(header: bytes) -> _Header:
    """Checks the clear-text header; returns segment size, compressed, nonce prefix, salt and
    whether it holds sparse pages.

    The header is authenticated only with the first segment, so these checks exist to give a clear
    message for what is plainly not (or not yet) a frame this drkit reads.
    """
    magic, version, flags, reserved, segment_size, salt, nonce_prefix = _HEADER.unpack(header)
    if magic != MAGIC:
        raise IntegrityError(
            f"not a drkit frame: bad magic 0x{magic.hex()}, expected 0x{MAGIC.hex()}"
        )
    if version != VERSION:
        raise IntegrityError(
            f"frame has unknown version {version} (this drkit reads version {VERSION}): "
            "it is damaged or was written by a newer drkit"
        )
    if flags & ~(FLAG_ZSTD | FLAG_SPARSE) or flags == FLAG_SPARSE:
        raise IntegrityError(
            f"frame has unknown flags 0x{flags:02x}: it is damaged or was written by a newer drkit"
        )
    if reserved:
        raise IntegrityError(f"frame header has non-zero reserved field 0x{reserved:04x}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise IntegrityError(
            f"frame header has invalid segment size {segment_size} "
            f"(must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE})"
        )
    return _Header(
        segment_size, bool(flags & FLAG_ZSTD), nonce_prefix, salt, bool(flags & FLAG_SPARSE)
    )


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
