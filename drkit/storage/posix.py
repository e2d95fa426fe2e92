"""Storage in a local directory (a disk, a NAS mount): one file per object, published atomically.

A write goes to a temporary file in `<root>/.tmp/` (the same filesystem, never listed), is fsynced,
made read-only, then published with `link(2)`. link never replaces an existing name, so of two
concurrent writers of one key exactly one wins and the other gets ObjectExists; a plain rename would
silently overwrite. The destination directory (and every directory the write created) is fsynced
before commit returns, so a committed object survives a power cut. A process killed mid-write leaves
only a temporary file, which `list()` never shows and `cleanup_temp()` removes.

The filesystem must support hard links (ext4, xfs, btrfs, zfs, NFS do; vfat and some SMB mounts do
not: those fail with a clear error at the first write).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from drkit.errors import ObjectExists, ObjectNotFound, StorageError
from drkit.fsutil import fsync_dir
from drkit.storage._scandir import scan
from drkit.storage.base import (
    BaseStorage,
    BaseWriter,
    Capabilities,
    ObjectInfo,
    no_space_error,
    validate_key,
    validate_prefix,
    validate_range,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from drkit.storage.base import ObjectWriter

_ErrorMapper = Callable[[OSError], StorageError]
_Stack = list[tuple[str, str, str]]  # directories still to walk: path, key prefix, name filter
_Scan = Callable[[str, str, str, _Stack], None]

TEMP_DIR = ".tmp"
"""The temporary area below the root; a key may not start with this component."""

FILE_MODE = 0o440
DIR_MODE = 0o750
READ_BUFFER = 256 * 1024
# A concurrent delete may remove a directory a write has just created (it was still empty);
# the write then recreates it. Two retries are plenty: the race needs a delete in that instant.
PUBLISH_ATTEMPTS = 3


# link(2) refuses an existing name; pread serves any range.
POSIX_CAPABILITIES = Capabilities(conditional_create=True, ranged_read=True)


class PosixStorage(BaseStorage):
    """Objects as read-only files below `root`; see the module docstring for the write protocol.

    Nothing is touched on construction; directories (the root included) are created by the first
    write that needs them.
    """

    def __init__(self, root: Path, name: str = "local") -> None:
        self.root = Path(root)
        self.name = name
        self.capabilities = POSIX_CAPABILITIES
        self._temp = self.root / TEMP_DIR

    @property
    def location(self) -> str:
        return f"directory '{self.root}'"

    def open_write(self, key: str) -> ObjectWriter:
        path = self._path(key)
        if self._is_object(path):
            raise self._exists_error(key)
        with self._os_errors("writing", key, self._temp):
            self._make_dirs(self._temp, key)
            fd, tmp = tempfile.mkstemp(dir=self._temp, prefix="write-", suffix=".tmp")
        return _PosixWriter(self, key, path, fd, Path(tmp))

    def open_read(
        self, key: str, offset: int = 0, length: int | None = None, *, sequential: bool = False
    ) -> BinaryIO:
        path = self._path(key)  # a local read is not a request: ``sequential`` changes nothing
        validate_range(offset, length)
        try:
            raw = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes the stream
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found_error(key) from None
        except OSError as err:
            raise self._error(err, "reading", key, path) from err
        reader = _RangeReader(
            raw, offset, length, lambda err: self._error(err, "reading", key, path)
        )
        return io.BufferedReader(reader, READ_BUFFER)

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found_error(key) from None
        except OSError as err:
            raise self._error(err, "reading", key, path) from err
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found_error(key)
        return ObjectInfo(key, st.st_size)

    def list_keys(self, prefix: str = "") -> list[str]:
        """The keys ``list(prefix)`` would give, sorted, without their sizes: no system call
        per object, only one per directory (a file system that does not say which entries are
        directories costs one per entry)."""
        found: list[str] = []
        self._walk(prefix, lambda d, k, n, stack: _scan_names(d, k, n, stack, found))
        found.sort()
        return found

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found: list[ObjectInfo] = []
        self._walk(prefix, lambda d, k, n, stack: _scan_dir(d, k, n, stack, found))
        found.sort(key=lambda info: info.key)
        return found

    def _walk(self, prefix: str, scan: _Scan) -> None:
        """Call ``scan(directory, key prefix, name filter, stack)`` for every directory below
        ``prefix``; ``scan`` adds the subdirectories to walk to ``stack``."""
        validate_prefix(prefix)
        # Only the directory named by the prefix's complete components needs walking; its
        # entries are filtered by the partial last component.
        dir_part, _, name_part = prefix.rpartition("/")
        if dir_part.split("/", 1)[0] == TEMP_DIR:
            return  # no key lives in the temporary area
        start = self.root / dir_part if dir_part else self.root
        stack = [(str(start), dir_part + "/" if dir_part else "", name_part)]
        while stack:
            directory, key_prefix, name_filter = stack.pop()
            try:
                scan(directory, key_prefix, name_filter, stack)
            except OSError as err:  # a Path only for the message: a listing walks many dirs
                raise self._error(err, "listing", prefix, Path(directory)) from err

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # not an object: deleting is idempotent
        except OSError as err:
            raise self._error(err, "deleting", key, path) from err
        # Also after "not found": a previous attempt may have unlinked without reaching the fsync.
        try:
            fsync_dir(path.parent)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as err:
            raise self._error(err, "deleting", key, path) from err
        self._remove_empty_dirs(path.parent)

    def cleanup_temp(self, older_than_s: float) -> int:
        """Remove temporary files not modified for `older_than_s` seconds; return how many.

        They are left by killed processes. A write in progress keeps its file's mtime fresh, but
        one stalled for longer than `older_than_s` loses its file and fails at commit, so pass a
        generous age (hours) while other drkit processes may be writing.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        with self._os_errors("cleaning up", TEMP_DIR, self._temp):
            try:
                entries = os.scandir(self._temp)
            except FileNotFoundError:
                return 0
            with entries:
                for entry in entries:
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                            continue
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        continue
                    removed += 1
        return removed

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == TEMP_DIR:
            raise ValueError(
                f"storage key {key!r} is reserved: '{TEMP_DIR}/' holds temporary files"
            )
        return self.root / key

    def _is_object(self, path: Path) -> bool:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _publish(self, tmp: Path, path: Path, key: str) -> None:
        """Link the fsynced temporary file to its final name and make the name durable."""
        for _ in range(PUBLISH_ATTEMPTS):
            self._make_dirs(path.parent, key)
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError:
                if path.is_dir():
                    raise self._conflict_error(key, path) from None
                raise self._exists_error(key) from None
            except FileNotFoundError:
                if not tmp.exists():
                    raise StorageError(
                        f"temporary file '{tmp}' of '{key}' in repository '{self.name}' vanished",
                        hint="was 'cleanup_temp' run with a short age while this write ran?",
                    ) from None
                continue  # a concurrent delete removed the new parent directory: recreate it
            except OSError as err:
                if err.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise StorageError(
                        f"unable to publish '{path}' in repository '{self.name}' because the"
                        f" filesystem refuses a hard link: {(err.strerror or str(err)).lower()}",
                        hint="use a filesystem with hard links (ext4, xfs, btrfs, zfs, nfs)"
                        " and keep the repository on one filesystem",
                    ) from err
                raise
            break
        else:
            raise StorageError(
                f"unable to create the directory of '{path}' in repository '{self.name}'"
                " because it keeps disappearing"
            )
        fsync_dir(path.parent)
        # The object is published and durable; a temporary name left behind is only a hard link
        # to it, which cleanup_temp removes.
        with contextlib.suppress(OSError):
            os.unlink(tmp)

    def _make_dirs(self, directory: Path, key: str | None = None) -> None:
        """Create `directory` and missing parents, fsyncing each new directory's parent."""
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            try:
                os.mkdir(new, DIR_MODE)
            except FileExistsError:
                if not new.is_dir():
                    raise self._conflict_error(key or str(new), new) from None
                continue  # a concurrent writer created it
            fsync_dir(new.parent)

    def _remove_empty_dirs(self, directory: Path) -> None:
        # Best effort: a directory that is not empty (or just got a new object) stays.
        while directory != self.root and self.root in directory.parents:
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = directory.parent

    @contextlib.contextmanager
    def _os_errors(self, action: str, key: str, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise self._error(err, action, key, path) from err

    def _error(self, err: OSError, action: str, key: str, path: Path) -> StorageError:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return no_space_error(key, self.name)
        if err.errno in (errno.EACCES, errno.EPERM):
            return StorageError(
                f"permission denied {action} '{path}' in repository '{self.name}'",
                hint=f"check the owner and mode of '{self.root}' and the directories below it",
            )
        if err.errno == errno.EROFS:
            return StorageError(
                f"read-only file system {action} '{path}' in repository '{self.name}'"
            )
        reason = (err.strerror or str(err)).lower()
        return StorageError(f"{action} '{path}' in repository '{self.name}' failed: {reason}")

    def _exists_error(self, key: str) -> ObjectExists:
        return ObjectExists(f"object '{key}' already exists in repository '{self.name}'")

    def _not_found_error(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object '{key}' not found in repository '{self.name}'")

    def _conflict_error(self, key: str, path: Path) -> StorageError:
        return StorageError(
            f"unable to write '{key}' to repository '{self.name}' because '{path}' is in the way",
            hint="an object and a directory of objects cannot share a name in a posix repository",
        )


class _PosixWriter(BaseWriter):
    def __init__(self, storage: PosixStorage, key: str, path: Path, fd: int, tmp: Path) -> None:
        super().__init__(key)
        self._storage = storage
        self._path = path
        self._tmp = tmp
        self._file = os.fdopen(fd, "wb")

    def _write(self, data: bytes | memoryview) -> None:
        with self._storage._os_errors("writing", self.key, self._tmp):
            self._file.write(data)

    def _commit(self) -> None:
        with self._storage._os_errors("writing", self.key, self._path):
            self._file.flush()
            os.fchmod(self._file.fileno(), FILE_MODE)
            os.fsync(self._file.fileno())
            self._file.close()
            self._storage._publish(self._tmp, self._path, self.key)

    def _abort(self) -> None:
        # Closing flushes the buffer, which may fail again (a full disk): irrelevant for data
        # that is being thrown away, and the descriptor is closed either way.
        with contextlib.suppress(OSError):
            self._file.close()
        with (
            self._storage._os_errors("discarding", self.key, self._tmp),
            contextlib.suppress(FileNotFoundError),
        ):
            os.unlink(self._tmp)


class _RangeReader(io.RawIOBase):
    """Reads `length` bytes (or to the end) of an open file from `offset`, mapping I/O errors."""

    def __init__(
        self,
        raw: io.FileIO,
        offset: int,
        length: int | None,
        map_error: _ErrorMapper,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._remaining = length
        self._map_error = map_error
        try:
            raw.seek(offset)
        except OSError as err:
            raw.close()
            raise map_error(err) from err

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._remaining is not None:
            view = view[: self._remaining]
        if not view:
            return 0
        try:
            count = self._raw.readinto(view) or 0
        except OSError as err:
            raise self._map_error(err) from err
        if self._remaining is not None:
            self._remaining -= count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


def _scan_dir(
    directory: str,
    key_prefix: str,
    name_filter: str,
    stack: list[tuple[str, str, str]],
    found: list[ObjectInfo],
) -> None:
    """Add one directory's objects to `found` and its subdirectories to `stack`. Symbolic links
    are neither: drkit never makes one, so it never follows one."""
    scanned = scan(directory)  # in C: the lstat per file is most of a large listing's time
    if scanned is None:
        return  # nothing below this prefix, or a concurrent delete removed it
    files, dirs = scanned
    for name in dirs:
        usable = name.startswith(name_filter) and _is_key_component(name)
        if usable and (key_prefix or name != TEMP_DIR):
            stack.append((os.path.join(directory, name), f"{key_prefix}{name}/", ""))
    for name, size in files:
        if name.startswith(name_filter) and _is_key_component(name):
            found.append(ObjectInfo(key_prefix + name, size))


def _scan_names(
    directory: str,
    key_prefix: str,
    name_filter: str,
    stack: list[tuple[str, str, str]],
    found: list[str],
) -> None:
    """``_scan_dir`` without the sizes: the entry types the directory itself gives."""
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            name = entry.name
            if not name.startswith(name_filter) or not _is_key_component(name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if key_prefix or name != TEMP_DIR:
                        stack.append((entry.path, f"{key_prefix}{name}/", ""))
                elif entry.is_file(follow_symlinks=False):
                    found.append(key_prefix + name)
            except FileNotFoundError:
                continue  # deleted while listing


def _is_key_component(name: str) -> bool:
    """Whether a directory entry can be part of a key (foreign files with odd names are skipped)."""
    if "\\" in name:
        return False
    if name.isascii():
        return True  # every key drkit writes
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
