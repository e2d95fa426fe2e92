"""The storage contract: a flat namespace of write-once byte objects.

Storage is "bytes only": it knows nothing about backups, manifests, compression or keys. Every
driver (posix.py, s3/) and every wrapper (the tests' fault injector) implements the same `Storage`
protocol, and one conformance suite (tests/storage/conformance.py) runs against all of them. What a
driver can do beyond the contract it declares in `Storage.capabilities`; callers ask, never guess
from the driver's class.

Keys are '/'-separated relative names such as ``backup/20261126-010000F/manifest``. A valid key is
non-empty, at most 1024 bytes of UTF-8 (S3's limit), and made of non-empty components of at most
255 bytes (a file name's limit) that are neither '.' nor '..' and contain no backslash or NUL; it
does not start with '/'. Invalid keys raise ValueError before any I/O. A key must not be both an
object and a leading "directory" of another key ('a' and 'a/b'): a directory on disk cannot
represent that, so drkit's repository layout never does it.

Errors, and whether retrying can help:
- ValueError: the caller passed an invalid key or range. Permanent.
- ObjectNotFound: the object does not exist. Permanent for that call.
- ObjectExists: a write-once object is already there. Permanent: drkit never overwrites.
- StorageError (any other): I/O failure, full disk, unreachable server. Drivers of remote stores
  have already retried transient failures (drkit.storage.retry wraps each request) when it is
  raised; the object being written is then not visible, so the write can start over.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Literal, Protocol, Self, runtime_checkable

from drkit.errors import ObjectNotFound, StorageError

MAX_KEY_BYTES = 1024
MAX_COMPONENT_BYTES = 255


@dataclass(frozen=True)
class ObjectInfo:
    """A committed object as listed or stat'ed: its key and its size in bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class WrittenObject:
    """What a commit made durable: key, size and the hex SHA-256 drkit computed while writing."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Capabilities:
    """What a driver guarantees beyond the required contract (pgBackRest's storage feature flags).

    conditional_create: the store itself refuses a commit to a key that exists, so of two
        concurrent writers of one key exactly one wins; without it only the check in
        `open_write` stands between them.
    ranged_read: `open_read` with an offset or length fetches only that range, so reading one
        file of a bundle costs its bytes, not the bundle's.
    object_lock: objects are written under a retention lock the store enforces; `delete` of one
        whose retention has not passed raises ObjectLocked, and `open_write` / `write_bytes`
        accept ``retain_until=`` for one object's date.
    remote: every `open_read` is at least one request over the network, with its round trip
        and (on S3) its price: a caller reads few long ranges (``sequential=True``: one request
        each) rather than many short ones.
    """

    conditional_create: bool = False
    ranged_read: bool = False
    object_lock: bool = False
    remote: bool = False


@runtime_checkable
class ObjectWriter(Protocol):
    """One object being written; nothing of it is visible before `commit()` returns.

    Use it as a context manager: leaving the block normally commits (unless already committed or
    aborted), leaving it with an exception aborts.
    """

    key: str

    def write(self, data: bytes | memoryview) -> None:
        """Append data. A failed write aborts the writer: it can then no longer be committed."""
        ...

    def commit(self) -> WrittenObject:
        """Make the object durable and visible, then return what was written.

        Raises ObjectExists if the key appeared since `open_write` (the existing object is never
        overwritten), StorageError on I/O failure; either way the writer is aborted. A failure
        in the final step (a lost reply, a failed directory fsync) may leave the object committed,
        as with any remote store: a retried write then gets ObjectExists, and the caller decides
        by `stat` or by reading it back. Calling commit again after success returns the same result.
        """
        ...

    def abort(self) -> None:
        """Discard everything written. Idempotent; a no-op after a successful commit."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """A store of write-once objects (a directory, an S3 prefix)."""

    name: str
    """The repository's name, for messages."""

    capabilities: Capabilities
    """What this store can do beyond the contract; see `Capabilities`."""

    @property
    def location(self) -> str:
        """Where the store is, for messages: a directory, or a bucket and prefix at an endpoint."""
        ...

    def open_write(self, key: str) -> ObjectWriter:
        """Start writing a new object; stream the bytes into the returned writer, then commit.

        Raises ObjectExists if the key already exists (checked again at commit, so of two
        concurrent writers of one key exactly one wins), StorageError on I/O failure.
        """
        ...

    def write_bytes(self, key: str, data: bytes) -> WrittenObject:
        """Write a whole object in one call; the same contract as `open_write` + `commit`."""
        ...

    def open_read(
        self, key: str, offset: int = 0, length: int | None = None, *, sequential: bool = False
    ) -> BinaryIO:
        """Open a committed object for streaming reads of `length` bytes from `offset`.

        `length=None` reads to the end; a range past the end yields what exists (possibly
        nothing). `read(n)` on the result returns fewer than n bytes only at the end of the
        range. Raises ObjectNotFound here (not at the first read) if the object does not exist,
        ValueError for a negative offset or length, StorageError on I/O failure (also from
        `read`). The caller closes the stream.

        `sequential` (with a `length`): the caller reads other ranges in parallel itself, so a
        remote store streams this range in order by one request (resumed if it breaks) instead
        of fetching parts of it ahead in parallel. Bytes and checks are the same either way.
        """
        ...

    def read_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read a range of a committed object into memory; the contract of `open_read`."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Return the key and size of a committed object; ObjectNotFound if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether a committed object has this key; never true for writes in progress."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every committed object whose key starts with `prefix`, sorted by key.

        A plain string prefix: 'backup/' lists everything below backup/ recursively, 'backup/2026'
        matches 'backup/20261126-010000F/manifest'. Writes in progress, aborted writes and a
        driver's internal files are never listed. A store that does not exist yet lists as empty.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove an object, durably. Idempotent: deleting a missing object is not an error."""
        ...


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a valid object key, raise ValueError otherwise."""
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a string, not {type(key).__name__}")
    if not key:
        raise ValueError("storage key must not be empty")
    _check_name(key, key.split("/"), what="key")
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` unchanged if some valid key could start with it, raise ValueError otherwise.

    The last component may be partial or empty ('backup/', 'backup/2026'); the ones before it must
    be valid key components.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"storage prefix must be a string, not {type(prefix).__name__}")
    if prefix:
        *dirs, last = prefix.split("/")
        _check_name(prefix, dirs, what="prefix")
        if len(last.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(
                f"storage prefix {prefix!r} has a component longer than {MAX_COMPONENT_BYTES} bytes"
            )
    return prefix


def _check_name(name: str, components: list[str], what: str) -> None:
    if "\\" in name or "\0" in name:
        raise ValueError(f"storage {what} {name!r} must not contain a backslash or NUL")
    if name.startswith("/"):
        raise ValueError(f"storage {what} {name!r} must be relative (no leading '/')")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"storage {what} {name!r} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"storage {what} {name!r} is longer than {MAX_KEY_BYTES} bytes")
    for part in components:
        if part in ("", ".", ".."):
            raise ValueError(f"storage {what} {name!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(
                f"storage {what} {name!r} has a component longer than {MAX_COMPONENT_BYTES} bytes"
            )


def validate_range(offset: int, length: int | None) -> None:
    """Raise ValueError unless offset >= 0 and length is None or >= 0."""
    if offset < 0:
        raise ValueError(f"read offset must not be negative, got {offset}")
    if length is not None and length < 0:
        raise ValueError(f"read length must not be negative, got {length}")


def no_space_error(key: str, repo_name: str) -> StorageError:
    """The error every driver raises when the store is full (ENOSPC, EDQUOT)."""
    return StorageError(
        f"no space left on device writing '{key}' to repository '{repo_name}'",
        hint="free space or raise the quota on the repository's storage, or run 'drkit prune'",
    )


class BaseWriter(ABC):
    """The `ObjectWriter` state machine; a driver implements `_write`, `_commit` and `_abort`.

    It counts and hashes the bytes on their way to the driver, so `WrittenObject.sha256` is what
    drkit sent, whatever the store reports.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._state: Literal["open", "committed", "aborted"] = "open"
        self._result: WrittenObject | None = None

    @abstractmethod
    def _write(self, data: bytes | memoryview) -> None:
        """Send data on its way; raise StorageError on failure."""

    @abstractmethod
    def _commit(self) -> None:
        """Publish the object durably; raise ObjectExists or StorageError, leaving nothing."""

    @abstractmethod
    def _abort(self) -> None:
        """Discard what was written; called at most once per writer."""

    def write(self, data: bytes | memoryview) -> None:
        self._require_open("write to")
        try:
            self._write(data)
        except BaseException:
            self._discard()
            raise
        self._sha256.update(data)
        self._size += memoryview(data).nbytes

    def commit(self) -> WrittenObject:
        if self._result is not None:
            return self._result
        self._require_open("commit")
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise
        self._state = "committed"
        self._result = WrittenObject(self.key, self._size, self._sha256.hexdigest())
        return self._result

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            self._abort()

    def _discard(self) -> None:
        # Cleanup after a failure: the original error is what the caller must see, and a leftover
        # temporary object is invisible and removed by the driver's cleanup.
        if self._state == "open":
            self._state = "aborted"
            with contextlib.suppress(StorageError):
                self._abort()

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise ValueError(f"cannot {action} '{self.key}': the writer is {self._state}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if self._state == "open":
                self.commit()
        else:
            self._discard()


class BaseStorage(ABC):
    """Implements the convenience methods of `Storage` on top of a driver's primitives."""

    name: str
    capabilities: Capabilities

    @property
    def location(self) -> str:
        return f"repository '{self.name}'"

    @abstractmethod
    def open_write(self, key: str) -> ObjectWriter: ...

    @abstractmethod
    def open_read(
        self, key: str, offset: int = 0, length: int | None = None, *, sequential: bool = False
    ) -> BinaryIO: ...

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def write_bytes(self, key: str, data: bytes) -> WrittenObject:
        with self.open_write(key) as writer:
            writer.write(data)
        return writer.commit()

    def read_bytes(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.open_read(key, offset, length) as stream:
            return stream.read()

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True
