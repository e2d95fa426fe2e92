"""Small filesystem helpers: durable writes (storage, keys, spool), early writeback (restore),
and reads past the page cache (backup)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def fileno(self) -> int: ...


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a link, an unlink) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (network, FUSE) cannot fsync a directory; their metadata is written
        # through anyway, as restic's local backend also assumes.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_new(
    path: Path, mode: int = 0o600, *, replace: bool = False, sync: bool = True
) -> Iterator[BinaryIO]:
    """Write the file ``path`` so that it appears whole or not at all; yields the file to write.

    The bytes go to a temporary file created exclusively beside ``path`` (the same filesystem),
    with ``mode`` set explicitly (the umask can only remove bits). When the block ends without an
    error the file is fsynced (with ``sync``) and published: hard-linked to ``path``, which raises
    FileExistsError if ``path`` exists (write-once), or with ``replace`` renamed over it; then the
    directory is fsynced (with ``sync``). An error in the block or in publishing removes the
    temporary file and leaves ``path`` as it was. OSErrors are raised as they are: the caller
    words them for its own file.
    """
    temporary = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            yield file
            file.flush()
            if sync:
                os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    if sync:
        fsync_dir(path.parent)


def os_reason(exc: OSError) -> str:
    """'no space left on device': the OS's words, lowercase, for one-line messages."""
    return (exc.strerror or str(exc)).lower()


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A C library function that only Linux has, or None elsewhere."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


# Without it (not Linux) the final sync does all the work
_SYNC_FILE_RANGE = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_SYNC_FILE_RANGE_WRITE = 2
_SYNCFS = _libc_function("syncfs", ctypes.c_int)


def sync_filesystems(fds: list[int]) -> None:
    """Make everything written to the file systems holding ``fds`` durable: syncfs(2) on each,
    which waits for those file systems only, not for whatever else the host is writing, and
    reports a failed writeback (sync(2) does neither); sync() where there is no syncfs."""
    if _SYNCFS is None:
        os.sync()
        return
    devices = set()
    for fd in fds:
        device = os.fstat(fd).st_dev
        if device in devices:
            continue
        devices.add(device)
        if _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it: a large
    restore then overlaps its disk writes with its decoding instead of paying them all in the
    final sync."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# Writes to files go to the kernel in pieces of at most this size. For a larger write the kernel
# takes large folios (2 MiB and up) for the page cache, from the free blocks a virtual machine's
# balloon reports back to its host: each of those pages then costs a fault in the host when first
# touched. Measured on this project's 2-vCPU VM: a chain restore writing 8 MiB (or 2 MiB) at a
# time spent 1.3-2 s more in the kernel than with 512 KiB writes (0.6-0.7 s).
WRITE_PIECE = 512 * 1024


def write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the file, WRITE_PIECE bytes at a time."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:WRITE_PIECE], offset)
        view, offset = view[written:], offset + written


# What O_DIRECT asks of a write: its offset, length and memory address multiples of the device's
# logical block size (512 or 4096 bytes), here always of 4096
DIRECT_ALIGN = 4096


def write_direct(fd: int, data: memoryview, offset: int) -> int:
    """Write ``data`` at ``offset`` of the file, as much of it as O_DIRECT allows straight from
    ``data``'s memory to the disk, bypassing the page cache: no copy into cached pages, no
    writeback later, and the host's memory is not touched for a cache no one reads (a restored
    cluster reads back little of its files). The rest (an unaligned tail, or all of it where the
    memory or offset is not aligned or the file system refuses O_DIRECT) is written through the
    page cache. Returns the bytes written through the page cache (their writeback is the
    caller's to start)."""
    direct = 0
    if offset % DIRECT_ALIGN == 0 and not data.readonly and _address(data) % DIRECT_ALIGN == 0:
        direct = len(data) - len(data) % DIRECT_ALIGN
    if direct and _set_direct(fd, True):
        written = 0
        try:
            while written < direct:
                written += os.pwrite(fd, data[written:direct], offset + written)
                if written % DIRECT_ALIGN:
                    break  # a short write off the alignment: the rest through the cache
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
        finally:
            _set_direct(fd, False)
        data, offset = data[written:], offset + written
    write_at(fd, data, offset)
    return len(data)


def _address(data: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(data))


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the file system refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False
    return True


def open_direct(path: Path) -> io.FileIO:
    """Open a file for reading with O_DIRECT: the disk reads straight into the caller's buffer
    (which must be page-aligned, e.g. an ``mmap``), without the kernel copying every byte through
    the page cache, and without evicting what the database has cached there. Falls back to an
    ordinary open where the filesystem refuses O_DIRECT. Read it with ``read_into``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return open(path, "rb", buffering=0)
    return io.FileIO(fd, "rb")


def read_into(stream: Readable, buffer: memoryview) -> int:
    """``stream.readinto(buffer)``; a read O_DIRECT refuses (an unaligned offset after a short
    read, a filesystem that accepted the flag at open only) is retried through the page cache."""
    try:
        return stream.readinto(buffer) or 0
    except OSError as err:
        if err.errno != errno.EINVAL or not _drop_direct(stream.fileno()):
            raise
        return stream.readinto(buffer) or 0


def pread_into(stream: Readable, buffer: memoryview, offset: int) -> int:
    """Read into ``buffer`` from ``offset`` (the stream's position is not used), with
    ``read_into``'s fallback when O_DIRECT refuses the read."""
    fd = stream.fileno()
    try:
        return os.preadv(fd, [buffer], offset)
    except OSError as err:
        if err.errno != errno.EINVAL or not _drop_direct(fd):
            raise
        return os.preadv(fd, [buffer], offset)


def _drop_direct(fd: int) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return True


def pread_cached(fd: int, length: int, offset: int) -> bytes:
    """Read a range through the page cache (what other processes see right now), also from a
    file opened with O_DIRECT, without touching that descriptor's flags or offset."""
    with open(f"/proc/self/fd/{fd}", "rb", buffering=0) as again:
        return os.pread(again.fileno(), length, offset)
