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

This module holds the format: its constants, the header, the per-frame key and the nonces.
frame_writer.py encodes (FrameWriter, seal), frame_reader.py decodes (decode_frame,
decode_chunks, unseal).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
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

HEADER_LAYOUT = struct.Struct(">4sBBHI32s7s")
NONCE_TAIL = struct.Struct(">IB")
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
HKDF_INFO = b"drkit-frame-v1\x00"

assert HEADER_LAYOUT.size == HEADER_SIZE


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


def is_sparse(header: bytes) -> bool:
    """Whether the frame with this header holds sparse-page records (see FrameWriter)."""
    return parse_header(header).sparse


def payload_length(header: bytes, length: int) -> int:
    """Bytes of payload in a frame of ``length`` stored bytes (the end of its last chunk)."""
    stored_segment = parse_header(header)[0] + TAG_SIZE
    body = length - HEADER_SIZE
    return body - max(1, -(-body // stored_segment)) * TAG_SIZE


def chunk_span(header: bytes, length: int, payload_start: int, payload_end: int) -> tuple[int, int]:
    """(offset, length) within the frame of the stored segments that hold payload bytes
    ``payload_start`` to ``payload_end`` (one chunk of a chunked frame)."""
    segment_size = parse_header(header)[0]
    stored_segment = segment_size + TAG_SIZE
    first, last = payload_start // segment_size, max(payload_end - 1, payload_start) // segment_size
    start = HEADER_SIZE + first * stored_segment
    end = min(HEADER_SIZE + (last + 1) * stored_segment, length)
    return start, end - start


def check_dek(dek: bytes) -> None:
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a data key is {DEK_SIZE} bytes, got {len(dek)}")


def derive_subkey(dek: bytes, salt: bytes, context: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO + context)
    return hkdf.derive(dek)


def segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    """The nonce of segment ``index``; ``last`` for the frame's final segment."""
    return nonce_prefix + NONCE_TAIL.pack(index, last)


class Header(NamedTuple):
    segment_size: int
    compressed: bool
    nonce_prefix: bytes
    salt: bytes
    sparse: bool


def parse_header(header: bytes) -> Header:
    """Checks the clear-text header; returns segment size, compressed, nonce prefix, salt and
    whether it holds sparse pages.

    The header is authenticated only with the first segment, so these checks exist to give a clear
    message for what is plainly not (or not yet) a frame this drkit reads.
    """
    magic, version, flags, reserved, segment_size, salt, nonce_prefix = HEADER_LAYOUT.unpack(header)
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
    return Header(
        segment_size, bool(flags & FLAG_ZSTD), nonce_prefix, salt, bool(flags & FLAG_SPARSE)
    )
