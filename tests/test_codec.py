"""Frames: round trips, the on-disk format, every tampering case, bounded memory."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drkit.codec.frame import DEFAULT_SEGMENT_SIZE, HEADER_SIZE, TAG_SIZE, FrameInfo
from drkit.codec.frame_reader import decode_frame, unseal
from drkit.codec.frame_writer import FrameWriter, seal
from drkit.errors import IntegrityError

S = 1024  # the smallest segment size, so multi-segment frames stay small
DEK = bytes(range(32))
CONTEXT = b"backup:20261126-010000F:base/5/1259"
MiB = 1024 * 1024


def compressible(size: int, seed: int = 0) -> bytes:
    """Text-like rows, about 4:1 under zstd level 3."""
    rows = b"".join(
        b"%08d,customer-%04d,%s\n" % (i, (i * 7919 + seed) % 10_000, b"active")
        for i in range(size // 30 + 1)
    )
    return rows[:size]


def encode(
    data: bytes,
    *,
    level: int | None = None,
    segment_size: int = S,
    dek: bytes = DEK,
    context: bytes = CONTEXT,
    chunk: int | None = None,
) -> tuple[bytes, FrameInfo]:
    parts: list[bytes] = []
    writer = FrameWriter(
        parts.append, dek, context, compress_level=level, segment_size=segment_size
    )
    step = chunk or max(1, len(data))
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
    info = writer.close()
    return b"".join(parts), info


def decode(
    blob: bytes, *, dek: bytes = DEK, context: bytes = CONTEXT, length: int | None = None
) -> bytes:
    source = io.BytesIO(blob)
    return b"".join(
        decode_frame(source.read, len(blob) if length is None else length, dek, context)
    )


def decode_until_error(
    blob: bytes, *, dek: bytes = DEK, context: bytes = CONTEXT, plain_size: int | None = None
) -> tuple[bytes, IntegrityError]:
    """Decodes a damaged frame; returns what was yielded before the error, and the error."""
    source = io.BytesIO(blob)
    received = bytearray()
    with pytest.raises(IntegrityError) as caught:
        for chunk in decode_frame(source.read, len(blob), dek, context, plain_size=plain_size):
            received += chunk
    return bytes(received), caught.value


def reference_frame(
    payload: bytes,
    *,
    compressed: bool,
    segment_size: int = S,
    dek: bytes = DEK,
    context: bytes = CONTEXT,
) -> bytes:
    """Builds a frame straight from the format description, independently of FrameWriter."""
    salt, prefix = os.urandom(32), os.urandom(7)
    header = b"DKF1" + bytes([1, int(compressed)]) + b"\0\0" + struct.pack(">I", segment_size)
    header += salt + prefix
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"drkit-frame-v1\x00" + context
    ).derive(dek)
    segments = [payload[i : i + segment_size] for i in range(0, len(payload), segment_size)]
    segments = segments or [b""]
    out = [header]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        nonce = prefix + struct.pack(">I", index) + (b"\x01" if last else b"\x00")
        out.append(AESGCM(key).encrypt(nonce, segment, header))
    return b"".join(out)


def flip(blob: bytes, offset: int, bit: int = 0) -> bytes:
    damaged = bytearray(blob)
    damaged[offset] ^= 1 << bit
    return bytes(damaged)


def segment_offset(index: int, segment_size: int = S) -> int:
    return HEADER_SIZE + index * (segment_size + TAG_SIZE)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [None, 3])
@pytest.mark.parametrize("size", [0, 1, S - 1, S, S + 1, 2 * S, 3 * S, 5 * S + 17])
def test_round_trip_around_segment_boundaries(size: int, level: int | None) -> None:
    data = os.urandom(size)
    blob, info = encode(data, level=level)
    assert decode(blob) == data
    assert info == FrameInfo(size, hashlib.sha256(data).hexdigest(), len(blob))


@pytest.mark.parametrize("size", [0, S - 1, S, S + 1, 3 * S])
def test_uncompressed_layout_has_no_empty_trailing_segment(size: int) -> None:
    blob, _ = encode(os.urandom(size))
    segments = max(1, -(-size // S))
    assert len(blob) == HEADER_SIZE + size + segments * TAG_SIZE


@pytest.mark.parametrize("level", [None, 1, 3, 19])
@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_round_trip_5_mib(kind: str, level: int | None) -> None:
    data = os.urandom(5 * MiB) if kind == "random" else compressible(5 * MiB)
    blob, info = encode(data, level=level, segment_size=DEFAULT_SEGMENT_SIZE)
    assert decode(blob) == data
    assert info.plain_size == len(data)
    assert info.plain_sha256 == hashlib.sha256(data).hexdigest()
    if kind == "compressible" and level is not None:
        assert len(blob) < len(data) // 3


def test_many_small_writes_equal_one_big_write() -> None:
    data = compressible(3 * MiB) + os.urandom(MiB)
    whole, whole_info = encode(data, level=3, segment_size=DEFAULT_SEGMENT_SIZE)
    for chunk in (1, 7, 4093, 65536):
        piece = data[: 64 * 1024] if chunk < 64 else data
        pieces, info = encode(piece, level=3, segment_size=DEFAULT_SEGMENT_SIZE, chunk=chunk)
        assert decode(pieces) == piece
        assert info.plain_sha256 == hashlib.sha256(piece).hexdigest()
    pieces, info = encode(data, level=3, segment_size=DEFAULT_SEGMENT_SIZE, chunk=4093)
    assert (info.plain_size, info.plain_sha256) == (whole_info.plain_size, whole_info.plain_sha256)
    assert decode(pieces) == decode(whole) == data


def test_uncompressed_frames_do_not_depend_on_how_input_is_split() -> None:
    data = os.urandom(10 * S + 5)
    one, one_info = encode(data)
    many, many_info = encode(data, chunk=333)
    assert one_info == many_info
    assert len(one) == len(many)


def test_writer_accepts_bytearray_and_memoryview() -> None:
    parts: list[bytes] = []
    writer = FrameWriter(parts.append, DEK, CONTEXT, segment_size=S)
    writer.write(bytearray(b"abc"))
    writer.write(memoryview(b"xdefx")[1:4])
    writer.close()
    assert decode(b"".join(parts)) == b"abcdef"


def test_seal_and_unseal() -> None:
    manifest = b'{"label": "20261126-010000F", "files": []}' * 100
    blob = seal(manifest, DEK, b"manifest:20261126-010000F")
    assert unseal(blob, DEK, b"manifest:20261126-010000F") == manifest
    assert unseal(seal(b"", DEK, b"k", compress_level=None), DEK, b"k") == b""
    with pytest.raises(IntegrityError):
        unseal(blob, DEK, b"manifest:20261127-010000F")


def test_decoder_accepts_short_reads() -> None:
    data = compressible(200_000)
    blob, _ = encode(data, level=3)
    source = io.BytesIO(blob)

    def dribble(size: int) -> bytes:
        return source.read(min(size, 100))

    assert b"".join(decode_frame(dribble, len(blob), DEK, CONTEXT)) == data


def test_decoder_reads_only_its_frame_from_a_bundle() -> None:
    first, _ = encode(b"first file", level=3)
    second, _ = encode(b"second file", level=None, context=b"other")
    bundle = io.BytesIO(first + second)
    assert b"".join(decode_frame(bundle.read, len(first), DEK, CONTEXT)) == b"first file"
    assert b"".join(decode_frame(bundle.read, len(second), DEK, b"other")) == b"second file"


# -- the format, as written down -----------------------------------------------------------------


def test_writer_follows_the_documented_format() -> None:
    data = os.urandom(2 * S + 10)
    blob, _ = encode(data)
    header = blob[:HEADER_SIZE]
    magic, version, flags, reserved, size = struct.unpack(">4sBBHI", header[:12])
    assert (magic, version, flags, reserved, size) == (b"DKF1", 1, 0, 0, S)
    salt, prefix = header[12:44], header[44:51]
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"drkit-frame-v1\x00" + CONTEXT
    ).derive(DEK)
    last = AESGCM(key).decrypt(
        prefix + struct.pack(">I", 2) + b"\x01", blob[segment_offset(2) :], header
    )
    assert last == data[2 * S :]
    compressed, _ = encode(data, level=3)
    assert compressed[5] == 1


@pytest.mark.parametrize("size", [0, 1, S, 3 * S, 3 * S + 1])
def test_decoder_reads_a_frame_built_from_the_format_description(size: int) -> None:
    data = os.urandom(size)
    assert decode(reference_frame(data, compressed=False)) == data
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    assert decode(reference_frame(packed, compressed=True)) == data


def test_every_zstd_header_variant_is_accepted() -> None:
    data = compressible(300_000)
    variants = [
        zstandard.ZstdCompressor(write_checksum=True).compress(data),  # content size + checksum
        zstandard.ZstdCompressor(write_content_size=False).compress(data),
        zstandard.ZstdCompressor(level=19).compress(b"x"),  # single-segment frame
        zstandard.ZstdCompressor().compress(bytes(5 * MiB)),  # RLE blocks
    ]
    expected = [data, data, b"x", bytes(5 * MiB)]
    for packed, plain in zip(variants, expected, strict=True):
        assert decode(reference_frame(packed, compressed=True)) == plain


# -- tampering ------------------------------------------------------------------------------------

FIVE_SEGMENTS = os.urandom(4 * S + 100)


@pytest.fixture(scope="module")
def frame() -> bytes:
    blob, _ = encode(FIVE_SEGMENTS)
    assert len(blob) == segment_offset(4) + 100 + TAG_SIZE
    return blob


@pytest.mark.parametrize("offset", range(HEADER_SIZE))
def test_header_bit_flip_fails_before_any_output(frame: bytes, offset: int) -> None:
    for bit in (0, 7):
        received, _ = decode_until_error(flip(frame, offset, bit))
        assert received == b""


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("where", ["first byte", "middle", "tag"])
def test_segment_bit_flip_fails_at_that_segment(frame: bytes, index: int, where: str) -> None:
    start = segment_offset(index)
    end = min(segment_offset(index + 1), len(frame))
    offset = {"first byte": start, "middle": (start + end - TAG_SIZE) // 2, "tag": end - 3}[where]
    received, error = decode_until_error(flip(frame, offset, 5))
    assert received == FIVE_SEGMENTS[: index * S]  # only segments before the damaged one
    assert f"segment {index} of 5 failed authentication" in str(error)


@pytest.mark.parametrize("segments", [1, 2, 3, 4])
def test_truncation_at_a_segment_boundary(frame: bytes, segments: int) -> None:
    received, _ = decode_until_error(frame[: segment_offset(segments)])
    assert received == FIVE_SEGMENTS[: (segments - 1) * S]


@pytest.mark.parametrize("cut", [1, 15, 16, 17, S // 2, S + 15])
def test_truncation_mid_segment(frame: bytes, cut: int) -> None:
    received, _ = decode_until_error(frame[: segment_offset(2) + cut])
    assert len(received) <= 2 * S


def test_truncation_into_the_header(frame: bytes) -> None:
    for length in (0, 4, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + TAG_SIZE - 1):
        received, error = decode_until_error(frame[:length])
        assert received == b""
        assert "truncated" in str(error)


def test_dropping_a_full_size_last_segment() -> None:
    data = os.urandom(3 * S)
    blob, _ = encode(data)
    assert len(blob) == segment_offset(3)  # the last segment is full, no empty one follows
    received, _ = decode_until_error(blob[: segment_offset(2)])
    assert received == data[:S]


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 2), (2, 3), (0, 3)])
def test_swapped_segments(frame: bytes, a: int, b: int) -> None:
    pieces = [frame[segment_offset(i) : segment_offset(i + 1)] for i in range(5)]
    pieces[a], pieces[b] = pieces[b], pieces[a]
    received, _ = decode_until_error(frame[:HEADER_SIZE] + b"".join(pieces))
    assert received == FIVE_SEGMENTS[: a * S]


def test_swapping_the_last_segment_in() -> None:
    data = os.urandom(3 * S)
    blob, _ = encode(data)
    pieces = [blob[segment_offset(i) : segment_offset(i + 1)] for i in range(3)]
    received, _ = decode_until_error(blob[:HEADER_SIZE] + pieces[2] + pieces[1] + pieces[0])
    assert received == b""


@pytest.mark.parametrize("extra", [1, 15, 16, 17, S + TAG_SIZE])
def test_appended_bytes(frame: bytes, extra: int) -> None:
    decode_until_error(frame + os.urandom(extra))
    full, _ = encode(os.urandom(2 * S))
    decode_until_error(full + os.urandom(extra))


def test_appended_copy_of_the_last_segment() -> None:
    blob, _ = encode(os.urandom(2 * S))
    decode_until_error(blob + blob[segment_offset(1) :])


def test_segment_spliced_from_another_frame(frame: bytes) -> None:
    other, _ = encode(os.urandom(len(FIVE_SEGMENTS)))
    spliced = frame[: segment_offset(2)] + other[segment_offset(2) : segment_offset(3)]
    spliced += frame[segment_offset(3) :]
    received, _ = decode_until_error(spliced)
    assert received == FIVE_SEGMENTS[: 2 * S]


def test_header_from_another_frame(frame: bytes) -> None:
    other, _ = encode(FIVE_SEGMENTS)
    received, _ = decode_until_error(other[:HEADER_SIZE] + frame[HEADER_SIZE:])
    assert received == b""


@pytest.mark.parametrize("level", [None, 3])
def test_wrong_context_and_wrong_key(level: int | None) -> None:
    blob, _ = encode(compressible(10 * S), level=level)
    for kwargs in ({"context": CONTEXT + b"x"}, {"context": b""}, {"dek": bytes(32)}):
        received, error = decode_until_error(blob, **kwargs)
        assert received == b""
        assert "segment 0 of" in str(error)


def test_compressed_frame_tampering() -> None:
    data = compressible(20 * S)
    blob, _ = encode(data, level=3)
    for offset in (0, 5, 30, HEADER_SIZE, HEADER_SIZE + 100, len(blob) - 1):
        received, _ = decode_until_error(flip(blob, offset))
        assert received == b"" or offset > segment_offset(1)
    decode_until_error(blob[:-1])
    decode_until_error(blob + b"\0")


def test_clear_messages_for_foreign_data(frame: bytes) -> None:
    _, error = decode_until_error(b"PK\x03\x04" + frame[4:])
    assert "not a drkit frame" in str(error)
    _, error = decode_until_error(frame[:4] + b"\x02" + frame[5:])
    assert "unknown version 2" in str(error)
    for flags in (b"\x04", b"\x02"):  # bit 2 is unknown; sparse pages come compressed only
        _, error = decode_until_error(frame[:5] + flags + frame[6:])
        assert "unknown flags" in str(error)
    _, error = decode_until_error(frame[:8] + struct.pack(">I", 100) + frame[12:])
    assert "invalid segment size 100" in str(error)
    for message in (error.message, str(error)):
        assert message == message.lower()


def test_source_shorter_than_the_recorded_length(frame: bytes) -> None:
    with pytest.raises(IntegrityError, match="truncated"):
        decode(frame[:-10], length=len(frame))


# -- the zstd stream inside an authentic frame ---------------------------------------------------


# Each test runs with the plaintext's size unknown (decoded as a stream) and known (given, as a
# restore gives it from the manifest: decoded in one call)
WHOLE = pytest.mark.parametrize("whole", [False, True], ids=["stream", "whole"])


@WHOLE
def test_truncated_zstd_stream_is_detected(whole: bool) -> None:
    data = compressible(100_000)
    size = len(data) if whole else None
    packed = zstandard.ZstdCompressor().compress(data)
    for cut in (1, 3, 4, len(packed) // 2, len(packed) - 1):
        frame = reference_frame(packed[:cut], compressed=True)
        received, error = decode_until_error(frame, plain_size=size)
        assert "truncated" in str(error) or "corrupt" in str(error)
        assert data.startswith(received)
    _, error = decode_until_error(reference_frame(b"", compressed=True), plain_size=size)
    assert "truncated" in str(error)


@WHOLE
def test_trailing_data_after_the_zstd_stream_is_detected(whole: bool) -> None:
    data = compressible(100_000)
    packed = zstandard.ZstdCompressor().compress(data)
    for extra in (b"\0", b"garbage", packed):
        frame = reference_frame(packed + extra, compressed=True)
        _, error = decode_until_error(frame, plain_size=len(data) if whole else None)
        assert "trailing data" in str(error)


@WHOLE
def test_corrupt_zstd_stream_is_detected(whole: bool) -> None:
    frame = reference_frame(b"not zstd at all", compressed=True)
    _, error = decode_until_error(frame, plain_size=100 if whole else None)
    assert "not a zstd frame" in str(error)
    # Authentication makes this unreachable for frames drkit wrote; zstd's own checksum makes the
    # damage certain to be noticed here.
    data = compressible(100_000)
    packed = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    packed[len(packed) // 2] ^= 0xFF
    frame = reference_frame(bytes(packed), compressed=True)
    _, error = decode_until_error(frame, plain_size=len(data) if whole else None)
    assert "corrupt" in str(error)


@pytest.mark.parametrize("level", [None, 3])
@pytest.mark.parametrize("size", [1, S + 1, 5 * S + 17, 3 * MiB])
def test_a_frame_of_known_size_decodes_in_one_piece(size: int, level: int | None) -> None:
    """Given its plaintext's size, a compressed frame comes as one piece, however many segments
    it spans; an uncompressed one segment by segment as before."""
    data = compressible(size)
    blob, _ = encode(data, level=level, chunk=S)
    pieces = list(decode_frame(io.BytesIO(blob).read, len(blob), DEK, CONTEXT, plain_size=size))
    assert b"".join(pieces) == data
    assert len(pieces) == (1 if level is not None else max(1, -(-size // S)))


def test_a_frame_longer_or_shorter_than_its_recorded_size_is_refused() -> None:
    """A whole decode never allocates or returns more than the size it was given: a frame whose
    zstd header records another size, or that holds more, is refused before or while decoding;
    one that holds less decodes short (the caller's size check reports it)."""
    data = compressible(100_000)
    recorded = reference_frame(zstandard.ZstdCompressor().compress(data), compressed=True)
    blob, _ = encode(data, level=3)  # streamed: its zstd header records no size
    for frame in (recorded, blob):
        _, error = decode_until_error(frame, plain_size=len(data) - 1)
        assert "recorded" in str(error)
    _, error = decode_until_error(recorded, plain_size=len(data) + 1)
    assert "recorded" in str(error)
    shorter = list(decode_frame(io.BytesIO(blob).read, len(blob), DEK, CONTEXT, plain_size=10**6))
    assert shorter == [data]


# -- bounded memory --------------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)


def peak_memory(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("level", [None, 3])
def test_encoding_200_mib_streamed_holds_a_few_segments(level: int | None) -> None:
    chunks = [os.urandom(MiB), compressible(MiB)]
    sink = Counter()

    def work() -> None:
        writer = FrameWriter(sink, DEK, CONTEXT, compress_level=level)
        for i in range(200):
            writer.write(chunks[i % 2])
        writer.close()

    assert peak_memory(work) < 8 * MiB
    assert sink.size > 100 * MiB


def test_one_huge_write_does_not_produce_a_huge_buffer() -> None:
    data = os.urandom(64 * MiB)
    sink = Counter()

    def work() -> None:
        writer = FrameWriter(sink, DEK, CONTEXT, compress_level=3)
        writer.write(data)
        writer.close()

    assert peak_memory(work) < 8 * MiB


def test_decoding_holds_a_few_segments_even_for_extreme_compression() -> None:
    # A GiB of zeros is ~32 KiB of zstd: one segment must not decompress into one GiB-sized chunk.
    zeros = bytes(MiB)
    parts: list[bytes] = []
    writer = FrameWriter(parts.append, DEK, CONTEXT, compress_level=3)
    for _ in range(256):
        writer.write(zeros)
    writer.close()
    blob = b"".join(parts)
    assert len(blob) < DEFAULT_SEGMENT_SIZE
    del zeros, parts
    largest = 0

    def work() -> None:
        nonlocal largest
        source = io.BytesIO(blob)
        total = 0
        for chunk in decode_frame(source.read, len(blob), DEK, CONTEXT):
            largest = max(largest, len(chunk))
            total += len(chunk)
        assert total == 256 * MiB

    assert peak_memory(work) < 8 * MiB
    assert largest <= 2 * MiB


def test_decoding_a_large_frame_streams() -> None:
    source_chunks = [os.urandom(MiB), compressible(MiB)]
    stored = io.BytesIO()
    writer = FrameWriter(stored.write, DEK, CONTEXT, compress_level=3)
    for i in range(64):
        writer.write(source_chunks[i % 2])
    info = writer.close()
    stored.seek(0)

    def work() -> None:
        digest = hashlib.sha256()
        for chunk in decode_frame(stored.read, info.stored_size, DEK, CONTEXT):
            digest.update(chunk)
        assert digest.hexdigest() == info.plain_sha256

    assert peak_memory(work) < 8 * MiB


# -- misuse ----------------------------------------------------------------------------------------


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="segment size"):
        FrameWriter(lambda _: None, DEK, CONTEXT, segment_size=512)
    with pytest.raises(ValueError, match="segment size"):
        FrameWriter(lambda _: None, DEK, CONTEXT, segment_size=16 * MiB + 1)
    with pytest.raises(ValueError, match="32 bytes"):
        FrameWriter(lambda _: None, DEK[:16], CONTEXT)
    writer = FrameWriter(lambda _: None, DEK, CONTEXT)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")
    with pytest.raises(ValueError, match="closed"):
        writer.close()


def _chunks(blob: bytes) -> Iterator[bytes]:
    source = io.BytesIO(blob)
    return decode_frame(source.read, len(blob), DEK, CONTEXT)


def test_a_frame_too_small_for_its_last_tag(frame: bytes) -> None:
    with pytest.raises(IntegrityError, match="does not fit its segments"):
        list(_chunks(frame[: segment_offset(4) + 5]))
