"""wal-push: archive one file that PostgreSQL hands to archive_command, write-once.

``Pusher.push(path)`` returns only once the object is durable in the repository. It is idempotent:
when the object already exists it is decrypted and its plaintext sha256 compared with the file's;
identical means success (PostgreSQL retried after a crash or lost reply), different means
WalConflict, and the archived object is never overwritten.

Before a segment (or a .partial) is stored, its first page header is checked against the
repository: a file that is not a WAL segment, a recycled segment, or WAL of another database
system (a second cluster pointed at this repository) is refused instead of archived.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from drkit.errors import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RepositoryError,
    repository_missing,
)
from drkit.fsutil import os_reason
from drkit.pg.wal import check_segment_header, parse_segment_name
from drkit.repo.wal_names import KeyPeriod, WalName, file_identity, parse_wal_name
from drkit.repo.wal_objects import RepoLike, WalKeyring, read_object, write_object
from drkit.wal.errors import WalConflict, WalSourceError

__all__ = [
    "PushOptions",
    "PushResult",
    "Pusher",
    "WalConflict",
    "WalSourceError",
    "file_identity",
    "repository_system_identifier",
]

# As in drkit.repo.repository, which imports pydantic (wal-push must not); a test compares them.
FORMAT_KEY = "drkit-repository.json"
FORMAT_VERSION = 1
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024
_LONG_HEADER_SIZE = 40


@dataclass(frozen=True)
class PushOptions:
    key_period: KeyPeriod = "daily"
    compress_level: int | None = 1


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    stored: bool  # False: an identical copy was already archived
    size: int  # plaintext bytes
    stored_size: int  # bytes of the object (0 when it was already there)
    sha256: str  # of the plaintext
    identity: str  # inode:size:mtime_ns of the file as read (the async spool's check)


def repository_system_identifier(repo: RepoLike) -> int:
    """Reads the repository's format object: refuses a missing or unknown-format repository."""
    try:
        raw = repo.storage.read_bytes(FORMAT_KEY)
    except ObjectNotFound:
        raise repository_missing(repo.name, repo.storage.location, reading=False) from None
    try:
        fmt = json.loads(raw)
        version, system_identifier = fmt["format"], int(fmt["system_identifier"])
    except (ValueError, KeyError, TypeError):
        raise RepositoryError(f"repository '{repo.name}' has a damaged format object") from None
    if version != FORMAT_VERSION:
        raise RepositoryError(
            f"repository '{repo.name}' has format {version}; this drkit reads format"
            f" {FORMAT_VERSION}",
            hint="use the drkit version that wrote it (see its created_by field)",
        )
    return system_identifier


class Pusher:
    """Pushes WAL files into one repository; thread-safe, so the async pusher shares one."""

    def __init__(
        self, repo: RepoLike, options: PushOptions, keyring: WalKeyring | None = None
    ) -> None:
        self.repo = repo
        self.options = options
        self.keyring = keyring or WalKeyring(repo)
        self._system_identifier: int | None = None

    @property
    def system_identifier(self) -> int:
        if self._system_identifier is None:
            self._system_identifier = repository_system_identifier(self.repo)
        return self._system_identifier

    def push(self, path: Path) -> PushResult:
        try:
            wal = parse_wal_name(path.name)
        except ValueError as exc:
            raise WalSourceError(str(exc), hint="archive_command = 'drkit wal-push %p'") from None
        try:
            source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise WalSourceError(f"WAL file '{path}' does not exist") from None
        except OSError as exc:
            raise WalSourceError(f"cannot read WAL file '{path}': {os_reason(exc)}") from None
        with source:
            try:
                st = os.fstat(source.fileno())
                if wal.kind in ("segment", "partial"):
                    self._check_segment(source, path, wal, st.st_size)
                try:
                    written, info = write_object(
                        self.repo,
                        self.keyring,
                        wal,
                        source,
                        key_period=self.options.key_period,
                        compress_level=self.options.compress_level,
                    )
                except ObjectExists:
                    return self._compare(source, path, wal, st)
            except OSError as exc:
                raise WalSourceError(f"cannot read WAL file '{path}': {os_reason(exc)}") from None
        return PushResult(
            wal.name,
            wal.key,
            True,
            info.plain_size,
            written.size,
            info.plain_sha256,
            file_identity(st),
        )

    def _check_segment(self, source: io.FileIO, path: Path, wal: WalName, size: int) -> None:
        if not MIN_SEGMENT_SIZE <= size <= MAX_SEGMENT_SIZE or size & (size - 1):
            raise WalSourceError(
                f"WAL file '{path}' is {size} bytes: not a WAL segment (a power of two from"
                " 1 MiB to 1 GiB)"
            )
        _timeline, segno = parse_segment_name(wal.segment, size)
        head = os.pread(source.fileno(), _LONG_HEADER_SIZE, 0)
        problem = check_segment_header(head, segno, size, self.system_identifier)
        if problem.startswith("belongs to database system"):
            raise RepositoryError(
                f"WAL file '{path}' {problem}: repository '{self.repo.name}' belongs to another"
                " cluster",
                hint="each cluster needs its own repository (path or S3 prefix)",
            )
        if problem:
            raise WalSourceError(f"WAL file '{path}' {problem}; it is not archived")

    def _compare(
        self, source: io.FileIO, path: Path, wal: WalName, st: os.stat_result
    ) -> PushResult:
        """The object exists: succeed if it holds exactly this file, else refuse loudly."""
        source.seek(0)
        local = hashlib.file_digest(source, "sha256").hexdigest()
        archived = hashlib.sha256()
        try:
            read_object(self.repo, self.keyring, wal, archived.update)
        except IntegrityError as exc:
            raise IntegrityError(
                f"WAL file '{wal.name}' is already archived, but the archived copy cannot be"
                f" read back: {exc}",
                hint="the archived object is never overwritten; run 'drkit verify' and"
                " investigate before removing it by hand",
            ) from None
        if archived.hexdigest() != local:
            raise WalConflict(
                f"WAL file {wal.name} already archived with different content in repository"
                f" '{self.repo.name}' (archived sha256 {archived.hexdigest()[:16]}..., this file"
                f" {local[:16]}...); the archived copy is kept unchanged",
                hint="another cluster or a restored copy on the same timeline is archiving into"
                " this repository; give it its own repository",
            )
        return PushResult(wal.name, wal.key, False, st.st_size, 0, local, file_identity(st))
