"""Host-local operation locks: two backups of one cluster never run at once.

A backup runs where PGDATA is, so a kernel lock (flock) on a file in ``lock_path`` is exact: it
is released when the process dies, however it dies, so a kill -9 never leaves a stale lock.
``lock_path`` and the lock file are opened as drkit/private_dir.py describes: never through a
link, never truncated, refused when another user could have planted them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from drkit.errors import LockError
from drkit.private_dir import open_lock_file, open_private_dir, write_pid


@dataclass(frozen=True)
class LockHolder:
    """A process holding an operation lock: its pid and when it took the lock; ``host`` when it
    runs on another host (known from the repository's lease)."""

    operation: str
    pid: int
    since: datetime
    host: str | None = None


def _lock_name(scope: str, operation: str) -> str:
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    return f"{operation}-{digest}.lock"


def lock_holder(lock_path: Path, scope: str, operation: str) -> LockHolder | None:
    """Who holds the ``operation`` lock for ``scope`` on this host, or None. Asks the kernel's
    lock table (/proc/locks) instead of trying the lock, so that it never makes an operation
    starting at that instant fail; creates nothing, follows no link."""
    try:
        fd = os.open(lock_path / _lock_name(scope, operation), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # never taken here, or not ours to read
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF" (blocked waiters are "->" lines)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            since = datetime.fromtimestamp(st.st_mtime, UTC)  # write_pid's write when taken
            return LockHolder(operation, int(fields[4]), since)
    return None


@contextmanager
def operation_lock(lock_path: Path, scope: str, operation: str) -> Iterator[None]:
    """Hold the ``operation`` lock for ``scope`` (e.g. the primary repository's location)."""
    name = _lock_name(scope, operation)
    path = lock_path / name
    dir_fd = open_private_dir(lock_path)
    try:
        fd = open_lock_file(dir_fd, lock_path, name)
    finally:
        os.close(dir_fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockError(
                f"another {operation} is already running for '{scope}' (pid {holder})",
                hint=f"wait for it to finish; the lock is '{path}'",
            ) from None
        write_pid(fd)
        yield
    finally:
        os.close(fd)
