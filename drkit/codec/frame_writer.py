"""Encoding frames: FrameWriter streams plaintext into a frame, seal() makes one in memory.

The format, and why it compresses before it encrypts, is described in drkit/codec/frame.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drkit.codec.frame import (
    DEFAULT_SEGMENT_SIZE,
    FLAG_SPARSE,
    FLAG_ZSTD,
    HEADER_LAYOUT,
    HEADER_SIZE,
    MAGIC,
    MAX_SEGMENT_SIZE,
    MAX_SEGMENTS,
    MIN_SEGMENT_SIZE,
    NONCE_PREFIX_SIZE,
    SALT_SIZE,
    VERSION,
    Chunk,
    FrameInfo,
    check_dek,
    derive_subkey,
    segment_nonce,
)

# Input is handed to the compressor in slices of this size, so one large write() cannot make the
# compressor return (and the writer hold) an equally large output.
_COMPRESS_SLICE = 1024 * 1024


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
        check_dek(dek)
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
        salt = os.urandom(SALT_SIZE)
        self._nonce_prefix = os.urandom(NONCE_PREFIX_SIZE)
        self._header = HEADER_LAYOUT.pack(
            MAGIC, VERSION, flags, 0, segment_size, salt, self._nonce_prefix
        )
        self._aead = AESGCM(derive_subkey(dek, salt, context))
        self._level = compress_level
        self._chunk_size = chunk_size if compress_level is not None else None
        self._compressor = (
            zstandard.ZstdCompressor(level=compress_level).compressobj()
            if compress_level is not None and self._chunk_size is None
            else None
        )
        self._chunks: list[Chunk] = []
        # The plaintext of the chunk being gathered: its first ``_filled`` bytes. The first chunk
        # grows as it is written; the next ones reuse the buffers of chunks already compressed,
        # so a large file costs no new memory (no page faults) per chunk
        self._buffer = bytearray()
        self._filled = 0
        self._spare: list[bytearray] = []
        self._chunked = 0  # plaintext bytes handed to the pool so far
        self._queued: deque[tuple[int, Future[tuple[bytes, str]], bytearray]] = deque()
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
                part = view[: self._chunk_size - self._filled]
                if len(self._buffer) > self._filled:  # a reused buffer
                    self._buffer[self._filled : self._filled + len(part)] = part
                else:
                    self._buffer += part
                self._filled += len(part)
                view = view[len(part) :]
                if self._filled == self._chunk_size:
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
        if self._chunk_size is not None and self._filled:
            self._submit_chunk()

    def _submit_chunk(self) -> None:
        """Compress the gathered chunk on the pool; emit finished chunks in order, keeping at
        most one chunk per worker in flight (memory: workers + 1 chunks)."""
        assert self._level is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="zstd")
        start = self._chunked
        # handed over, not copied: the next chunk is gathered in another buffer
        buffer, data = self._buffer, memoryview(self._buffer)[: self._filled]
        self._buffer, self._filled = self._spare.pop() if self._spare else bytearray(), 0
        self._chunked += len(data)
        job = self._pool.submit(_compress_chunk, self._level, data, self._sparse)
        self._queued.append((start, job, buffer))
        while len(self._queued) > self._workers:
            self._emit_chunk()

    def _emit_chunk(self) -> None:
        start, future, buffer = self._queued.popleft()
        compressed, sha256 = future.result()
        self._spare.append(buffer)
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
            compressed, sha256 = _compress_chunk(
                self._level, memoryview(self._buffer)[: self._filled], self._sparse
            )
            self._chunks.append(Chunk(0, 0, sha256))
            self._push(memoryview(compressed))
        elif self._pool is not None:
            try:
                if self._filled:
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
        nonce = segment_nonce(self._nonce_prefix, self._index, last)
        sealed = self._aead.encrypt(nonce, segment, self._header)
        self._index += 1
        self._stored_size += len(sealed)
        self._sink(sealed)


def seal(data: bytes, dek: bytes, context: bytes, compress_level: int | None = 3) -> bytes:
    """Encodes ``data`` as one frame in memory (manifests, key records)."""
    parts: list[bytes] = []
    writer = FrameWriter(parts.append, dek, context, compress_level=compress_level)
    writer.write(data)
    writer.close()
    return b"".join(parts)


def _compress_chunk(level: int, data: memoryview, sparse: bool) -> tuple[bytes, str]:
    """One chunk as one zstd frame (of its sparse-page record), and its checksum (both release
    the GIL)."""
    payload: bytes | memoryview = data
    if sparse:
        from drkit.codec.sparse_pages import encode  # numpy: only for XOR deltas

        payload = encode(data)
    return _compressor(level).compress(payload), hashlib.sha256(data).hexdigest()


# Each compressing thread keeps one zstd context per level: a new one per chunk allocates (and
# faults in) its tables and window each time
_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_compressors, "by_level", None)
    if by_level is None:
        by_level = _compressors.by_level = {}
    if level not in by_level:
        by_level[level] = zstandard.ZstdCompressor(level=level)
    return by_level[level]
