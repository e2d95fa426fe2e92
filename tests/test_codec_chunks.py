"""Chunked frames: one frame whose payload is several zstd frames, decodable whole or by chunk."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drkit.codec.frame import HEADER_SIZE, chunk_span, is_sparse, payload_length
from drkit.codec.frame_reader import decode_chunks, decode_frame
from drkit.codec.frame_writer import FrameWriter
from drkit.codec.sparse_pages import SparsePages, SparseStream, encode, expand
from drkit.errors import IntegrityError
from drkit.pg.constants import PAGE_SIZE

DEK = os.urandom(32)
CONTEXT = b"file:test:base/1/1259"


def chunked(
    data: bytes, chunk: int, segment: int = 4096, sparse: bool = False
) -> tuple[bytes, list]:  # type: ignore[type-arg]
    out = io.BytesIO()
    writer = FrameWriter(
        out.write, DEK, CONTEXT, segment_size=segment, chunk_size=chunk, sparse_pages=sparse
    )
    for start in range(0, len(data), 7777):  # writes that straddle chunk boundaries
        writer.write(data[start : start + 7777])
    info = writer.close()
    assert info.plain_sha256 == hashlib.sha256(data).hexdigest()
    return out.getvalue(), list(info.chunks)


def decode_one(frame: bytes, chunks: list, i: int, raw: bool = False) -> bytes:  # type: ignore[type-arg]
    header = frame[:HEADER_SIZE]
    end = (
        chunks[i + 1].payload_offset if i + 1 < len(chunks) else payload_length(header, len(frame))
    )
    offset, length = chunk_span(header, len(frame), chunks[i].payload_offset, end)
    stream = io.BytesIO(frame[offset : offset + length])
    payload = one_chunk(
        header, stream.read, len(frame), DEK, CONTEXT, chunks[i].payload_offset, end
    )
    return b"".join(payload if raw or not is_sparse(header) else expand(payload))


def one_chunk(
    header: bytes,
    read: Callable[[int], bytes],
    length: int,
    dek: bytes,
    context: bytes,
    start: int,
    end: int,
) -> Iterator[bytes]:
    """The pieces of the one chunk [start, end) of a frame's payload."""
    pieces = decode_chunks(header, read, length, dek, context, [start, end])
    return (piece for piece in pieces if piece is not None)


@pytest.mark.parametrize("size", [0, 1, 50_000, 100_000, 100_001, 345_678])
def test_chunks_decode_alone_and_together(size: int) -> None:
    data = (os.urandom(300) + b"compressible text " * 100) * (size // 2100 + 1)
    data = data[:size]
    frame, chunks = chunked(data, chunk=50_000)
    assert len(chunks) == max(1, -(-size // 50_000))
    assert [c.plain_offset for c in chunks] == list(range(0, max(size, 1), 50_000))[: len(chunks)]
    whole = b"".join(
        decode_frame(io.BytesIO(frame).read, len(frame), DEK, CONTEXT, zstd_frames=len(chunks))
    )
    assert whole == data
    for i, chunk in enumerate(chunks):
        plain = decode_one(frame, chunks, i)
        assert plain == data[chunk.plain_offset : chunk.plain_offset + len(plain)]
        assert hashlib.sha256(plain).hexdigest() == chunk.plain_sha256


def test_a_run_of_chunks_decodes_in_one_pass_as_each_does_alone() -> None:
    """decode_chunks reads and decrypts each segment of a run of chunks once (segments here are
    smaller than chunks and not aligned to them) and marks each chunk's end; a run whose stored
    bytes end early is reported, not returned short."""
    data = (os.urandom(3000) + bytes(7000)) * 40
    frame, chunks = chunked(data, chunk=50_000, segment=16_384)
    header = frame[:HEADER_SIZE]
    bounds = [c.payload_offset for c in chunks[1:4]] + [chunks[4].payload_offset]
    offset, length = chunk_span(header, len(frame), bounds[0], bounds[-1])
    stored = frame[offset : offset + length]
    reads: list[int] = []

    def read(n: int) -> bytes:
        reads.append(n)
        return stream.read(n)

    stream = io.BytesIO(stored)
    decoded = list(decode_chunks(header, read, len(frame), DEK, CONTEXT, bounds))
    assert sum(reads) == len(stored)  # every stored byte read once
    ends = [i for i, piece in enumerate(decoded) if piece is None]
    assert len(ends) == 3 and ends[-1] == len(decoded) - 1
    runs, start = [], 0
    for end in ends:
        runs.append(b"".join(p for p in decoded[start:end] if p is not None))
        start = end + 1
    assert runs == [decode_one(frame, chunks, i) for i in (1, 2, 3)]
    stream = io.BytesIO(stored[:-20_000])
    with pytest.raises(IntegrityError, match="truncated"):
        list(decode_chunks(header, stream.read, len(frame), DEK, CONTEXT, bounds))
    # Given each chunk's plaintext size, each chunk comes as one piece, then its end marker
    sizes = [len(run) for run in runs]
    decoded = list(
        decode_chunks(header, io.BytesIO(stored).read, len(frame), DEK, CONTEXT, bounds, sizes)
    )
    assert decoded == [runs[0], None, runs[1], None, runs[2], None]
    for wrong in ([sizes[0] - 1, *sizes[1:]], [sizes[0] + 1, *sizes[1:]]):
        with pytest.raises(IntegrityError, match="recorded"):
            list(
                decode_chunks(
                    header, io.BytesIO(stored).read, len(frame), DEK, CONTEXT, bounds, wrong
                )
            )
    stream = io.BytesIO(stored[:-20_000])
    with pytest.raises(IntegrityError, match="truncated"):
        list(decode_chunks(header, stream.read, len(frame), DEK, CONTEXT, bounds, sizes))


@pytest.mark.parametrize("reuse", [False, True])
def test_a_chunk_decoded_whole_is_exactly_one_zstd_frame_of_its_recorded_size(reuse: bool) -> None:
    """Chunks decoded in one call each, into a new object or (``reuse``) into the thread's
    buffers, come whole and equal; a recorded size too small or too large, a payload holding
    a second zstd frame after the first, or a cut run are reported, never returned short."""
    data = (os.urandom(3000) + bytes(7000)) * 40
    frame, chunks = chunked(data, chunk=50_000, segment=16_384)
    header = frame[:HEADER_SIZE]
    bounds = [c.payload_offset for c in chunks[1:5]]
    offset, length = chunk_span(header, len(frame), bounds[0], bounds[-1])
    stored = frame[offset : offset + length]
    runs = [decode_one(frame, chunks, i) for i in (1, 2, 3)]
    sizes = [len(run) for run in runs]

    def decoded(bounds: list[int], sizes: list[int], stored: bytes = stored) -> list[bytes | None]:
        pieces = decode_chunks(
            header, io.BytesIO(stored).read, len(frame), DEK, CONTEXT, bounds, sizes, reuse=reuse
        )
        # a reused buffer holds a piece only until the next chunk decodes: copy each at once
        return [None if piece is None else bytes(piece) for piece in pieces]

    assert decoded(bounds, sizes) == [runs[0], None, runs[1], None, runs[2], None]
    for wrong in ([sizes[0] - 1, *sizes[1:]], [sizes[0] + 1, *sizes[1:]]):
        with pytest.raises(IntegrityError, match="recorded"):
            decoded(bounds, wrong)
    with pytest.raises(IntegrityError, match="trailing data"):
        decoded([bounds[0], bounds[2]], [sizes[0]])
    with pytest.raises(IntegrityError, match="truncated"):
        decoded(bounds, sizes, stored[:-20_000])


def test_wrong_frame_count_is_detected() -> None:
    frame, chunks = chunked(os.urandom(120_000), chunk=50_000)
    assert len(chunks) == 3
    with pytest.raises(IntegrityError, match="trailing data"):
        list(decode_frame(io.BytesIO(frame).read, len(frame), DEK, CONTEXT, zstd_frames=2))
    with pytest.raises(IntegrityError, match="truncated"):
        list(decode_frame(io.BytesIO(frame).read, len(frame), DEK, CONTEXT, zstd_frames=4))


def test_damaged_chunk_fails_authentication_and_others_still_decode() -> None:
    data = os.urandom(200_000)
    frame, chunks = chunked(data, chunk=50_000)
    damaged = bytearray(frame)
    header = frame[:HEADER_SIZE]
    offset, _ = chunk_span(header, len(frame), chunks[2].payload_offset, chunks[3].payload_offset)
    damaged[offset + 100] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        decode_one(bytes(damaged), chunks, 2)
    assert decode_one(bytes(damaged), chunks, 0) == data[:50_000]


def test_chunk_with_another_key_or_context_fails() -> None:
    frame, chunks = chunked(os.urandom(100_000), chunk=50_000)
    header = frame[:HEADER_SIZE]
    offset, length = chunk_span(header, len(frame), 0, chunks[1].payload_offset)
    for dek, context in ((os.urandom(32), CONTEXT), (DEK, b"file:test:base/1/other")):
        stream = io.BytesIO(frame[offset : offset + length])
        with pytest.raises(IntegrityError, match="failed authentication"):
            list(one_chunk(header, stream.read, len(frame), dek, context, 0, 10))


def xor_like(pages: int, tail: int = 0) -> bytes:
    """Pages that are mostly zeros, as an XOR delta's are: a few changed bytes each."""
    data = np.zeros(pages * PAGE_SIZE + tail, dtype=np.uint8)
    rng = np.random.default_rng(pages)
    spots = rng.integers(0, len(data), size=len(data) // 300) if len(data) else []
    data[spots] = rng.integers(1, 256, size=len(spots))
    return data.tobytes()


@pytest.mark.parametrize(("pages", "tail"), [(0, 0), (1, 0), (5, 100), (20, 0), (33, 8191)])
def test_sparse_pages_decode_alone_and_together_as_written(pages: int, tail: int) -> None:
    """A frame of sparse pages holds each chunk as a record of its non-zero words: decoded
    whole or chunk by chunk it gives back exactly the pages written (a partial last page too),
    or the records themselves; it stores far less than the pages' size."""
    data = xor_like(pages, tail)
    frame, chunks = chunked(data, chunk=8 * PAGE_SIZE, sparse=True)
    assert is_sparse(frame[:HEADER_SIZE])
    whole = b"".join(
        decode_frame(io.BytesIO(frame).read, len(frame), DEK, CONTEXT, zstd_frames=len(chunks))
    )
    assert whole == data
    for i, chunk in enumerate(chunks):
        plain = decode_one(frame, chunks, i)
        assert plain == data[chunk.plain_offset : chunk.plain_offset + 8 * PAGE_SIZE]
        assert hashlib.sha256(plain).hexdigest() == chunk.plain_sha256
        records = SparseStream()
        (record,) = records.feed(decode_one(frame, chunks, i, raw=True))
        records.finish()
        assert record.size == len(plain) and record.dense() == plain
    if pages >= 20:
        assert len(frame) * 10 < len(data)


def test_sparse_pages_need_compressed_chunks_and_damage_is_reported() -> None:
    with pytest.raises(ValueError, match="compressed chunks"):
        FrameWriter(io.BytesIO().write, DEK, CONTEXT, sparse_pages=True)
    record = encode(xor_like(3, 10))
    records = SparseStream()
    assert list(records.feed(record[:-1])) == []  # a record ending early: not complete
    with pytest.raises(IntegrityError, match="end inside a record"):
        records.finish()
    size = 3 * PAGE_SIZE - 100  # three pages, the last partial, and every word set
    index = np.tile(np.arange(1024, dtype="<u2"), 3)
    full = struct.pack("<Q", size) + np.full(3, 1024, "<u2").tobytes() + index.tobytes()
    (extended,) = SparseStream().feed(full + bytes([1]) * 8 * 3 * 1024)
    with pytest.raises(IntegrityError, match="past their length"):
        extended.dense()
    index[5] = index[4]  # a word twice
    twice = struct.pack("<Q", size) + np.full(3, 1024, "<u2").tobytes() + index.tobytes()
    (record,) = SparseStream().feed(twice + bytes(8 * 3 * 1024))
    with pytest.raises(IntegrityError, match="out of order"):
        record.dense()


def test_sparse_words_land_only_where_asked_and_bad_requests_are_refused() -> None:
    """The C loop applying a record: pages go to the window rows asked for (-1: passed over,
    yet checked), and a row outside the window, pages the record does not hold, or a record
    whose lengths do not add up are refused instead of writing anywhere."""
    data = xor_like(6)
    (record,) = SparseStream().feed(encode(data))
    window = np.zeros((4, PAGE_SIZE), dtype=np.uint8)
    record.xor_into(window, 2, np.array([3, -1, 0]))  # pages 2, 3, 4 of the record
    pages = np.frombuffer(data, dtype=np.uint8).reshape(6, PAGE_SIZE)
    assert (window[3] == pages[2]).all() and (window[0] == pages[4]).all()
    assert not window[1:3].any()
    record.xor_into(window, 2, np.array([3]))  # XOR again: back to zero
    assert not window[3].any()
    for first, rows in [(0, [4]), (0, [-2]), (5, [0, 1]), (-1, [0])]:
        with pytest.raises(IntegrityError):
            record.xor_into(window, first, np.array(rows))
    for damaged in (bytes(record.record)[:-1], bytes(record.record) + b"\0"):
        with pytest.raises(IntegrityError, match="do not add up"):
            SparsePages(record.size, damaged).xor_into(window, 0, np.array([0]))
