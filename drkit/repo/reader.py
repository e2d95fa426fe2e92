"""Read the files stored in one data object, frame by frame, authenticated and checked.

Used by restore (which writes the plaintext out) and verify (which only checks it). The object is
read once, sequentially, in one request; a frame that fails authentication is skipped over so the
files after it in the same bundle are still read and reported on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from drkit.codec.frame_reader import decode_frame
from drkit.errors import DrkitError, IntegrityError
from drkit.repo.manifest import FileEntry, ObjectEntry
from drkit.repo.repository import Repository, file_context

_Plain = TypeVar("_Plain", bytes, bytes | memoryview)


@dataclass(frozen=True)
class FileOutcome:
    entry: FileEntry
    error: DrkitError | None  # None: every byte authenticated and the checksum matched


class _ObjectStream:
    """Sequential reads from an object, hashing every byte so the object checksum is checked."""

    def __init__(self, stream: BinaryIO, key: str, hashing: bool) -> None:
        self._stream = stream
        self._key = key
        self.position = 0
        self.sha256 = hashlib.sha256() if hashing else None

    def read(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) < n:
            raise IntegrityError(
                f"object '{self._key}' ends early at byte {self.position + len(data)}"
            )
        if self.sha256 is not None:
            self.sha256.update(data)
        self.position += len(data)
        return data

    def skip_to(self, offset: int) -> None:
        while self.position < offset:
            self.read(min(1024 * 1024, offset - self.position))

    def drain(self) -> str:
        """Read to the end; the hex sha256 of the whole object."""
        assert self.sha256 is not None
        while chunk := self._stream.read(1024 * 1024):
            self.sha256.update(chunk)
            self.position += len(chunk)
        return self.sha256.hexdigest()


def read_object(
    repo: Repository,
    obj: ObjectEntry,
    entries: list[FileEntry],
    dek: bytes,
    label: str,
    consume: Callable[[FileEntry, Iterator[bytes]], None],
    *,
    check_object: bool = True,
    checked_later: Collection[str] = (),
) -> list[FileOutcome]:
    """Decode every file of ``entries`` (all stored in ``obj`` of ``repo``) and hand its
    plaintext chunks to ``consume``, which must iterate them fully. Checks each file's size and
    sha256 (only the size for the paths in ``checked_later``: a restore checks the whole file it
    assembles from several frames once it is complete), and with ``check_object`` the object's
    own size and sha256 (verify does; a restore need not: every byte it uses is in an
    authenticated frame). Returns one outcome per file; an error reading the object itself (it
    is missing, shorter) marks the remaining files failed."""
    outcomes: list[FileOutcome] = []
    pending = sorted(entries, key=lambda e: e.offset)
    with repo.storage.open_read(obj.key) as raw:
        stream = _ObjectStream(raw, obj.key, hashing=check_object)
        for index, entry in enumerate(pending):
            try:
                stream.skip_to(entry.offset)
            except IntegrityError as exc:
                outcomes += [FileOutcome(e, exc) for e in pending[index:]]
                return outcomes
            end = entry.offset + entry.length
            error: DrkitError | None = None
            try:
                chunks = decode_frame(
                    stream.read,
                    entry.length,
                    dek,
                    file_context(label, entry.path),
                    zstd_frames=len(entry.chunks or [None]),
                    plain_size=entry.payload_size,
                )
                consume(entry, checked(entry, chunks, entry.path not in checked_later))
            except DrkitError as exc:
                error = exc
            try:
                stream.skip_to(end)
            except IntegrityError as exc:
                outcomes.append(FileOutcome(entry, error or exc))
                outcomes += [FileOutcome(e, exc) for e in pending[index + 1 :]]
                return outcomes
            outcomes.append(FileOutcome(entry, error))
        if not check_object:
            return outcomes
        digest = stream.drain()
    if stream.position != obj.size or digest != obj.sha256:
        damage = IntegrityError(f"object '{obj.key}' does not match its recorded checksum")
        outcomes = [FileOutcome(o.entry, o.error or damage) for o in outcomes]
    return outcomes


def checked(entry: FileEntry, chunks: Iterator[bytes], hashing: bool) -> Iterator[bytes]:
    """``chunks`` of ``entry``'s frame, its payload size (and with ``hashing`` its sha256)
    checked once they are all through."""
    sha256 = entry.payload_sha256 if hashing else None
    return checked_pieces(chunks, entry.payload_size, sha256, f"'{entry.path}'")


def checked_pieces(
    pieces: Iterator[_Plain], size: int, sha256: str | None, name: str
) -> Iterator[_Plain]:
    """``pieces``, their total ``size`` (and with ``sha256`` their checksum) checked once they
    are all through; ``name`` says what they are in the error."""
    digest = hashlib.sha256() if sha256 is not None else None
    seen = 0
    for piece in pieces:
        if digest is not None:
            digest.update(piece)
        seen += len(piece)
        yield piece
    if seen != size or (digest is not None and digest.hexdigest() != sha256):
        raise IntegrityError(f"checksum mismatch in {name}")
