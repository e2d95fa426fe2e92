"""The checksums drkit records with each object, and the ones the store keeps.

Checksums, checked by drkit
    drkit computes SHA-256 while writing. A single-PUT object carries it as metadata
    (``x-amz-meta-drkit-sha256``) and as ``x-amz-checksum-sha256``, which AWS and MinIO verify on
    upload (a body damaged on its way is refused: BadDigest, sent again). For a store that
    verifies nothing (moto), drkit compares the reply's ETag, the MD5 of what the store kept,
    with the body's: a damaged object is deleted and sent again (s3/writer.py).
    The metadata of a multipart object is fixed before its data is known, so it carries its part
    size (``x-amz-meta-drkit-part-size``) instead; every part is sent with its SHA-256, and the
    store keeps the composite checksum (SHA-256 of the part digests, ``<b64>-<parts>``). After
    completing, drkit compares the store's composite with its own, so a store that does not
    validate (moto) cannot keep damaged parts unnoticed.
    A read of a whole object (offset 0 to the end) is verified as it streams: against the
    metadata digest, or, for a multipart object, by recomputing the composite from the part
    boundaries. A mismatch raises IntegrityError before the last bytes are returned. An object
    with neither metadata was not written by drkit (or was replaced) and fails too. A multipart
    object whose store keeps no SHA-256 composite (a store without checksum support, or a copy
    made by another tool with other part sizes) cannot be checked by this layer; it is read
    with a warning. Ranged reads are not verified here: the frame AEAD of the repository format
    authenticates every range drkit reads.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

META_SHA256 = "drkit-sha256"
META_PART_SIZE = "drkit-part-size"


@dataclass(frozen=True)
class _StoredChecksum:
    """What HeadObject reports: the SHA-256 checksum (``<b64>`` or ``<b64>-<parts>``), whether it
    is a full-object one, and whether the store keeps a checksum of another algorithm."""

    sha256: str | None
    full_object: bool = False
    others: bool = False

    @classmethod
    def from_head(cls, head: dict[str, Any]) -> _StoredChecksum:
        others = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumCRC64NVME")
        return cls(
            head.get("ChecksumSHA256"),
            head.get("ChecksumType") == "FULL_OBJECT",
            any(head.get(name) for name in others),
        )

    def matches(self, composite: str, parts: int) -> bool | None:
        """Compare with drkit's composite of `parts` part digests; None if not comparable."""
        if self.sha256 is None or self.full_object:
            return None
        value, _, count = self.sha256.partition("-")
        if count and count != str(parts):
            return None
        return value == composite


def composite_checksum(data: bytes, part_size: int) -> str:
    """The S3 composite SHA-256 of `data` uploaded in `part_size` parts (``<b64>-<parts>``)."""
    parts = max(1, math.ceil(len(data) / part_size))
    digests = (
        hashlib.sha256(data[i * part_size : (i + 1) * part_size]).digest() for i in range(parts)
    )
    return f"{_composite(digests)}-{parts}"


def _composite(digests: Iterable[bytes]) -> str:
    """The composite of the part digests, without its ``-<parts>`` suffix."""
    return _b64(hashlib.sha256(b"".join(digests)).digest())


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
