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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drkit.errors import LockError
from drkit.private_dir import open_lock_file, open_private_dir, write_pid


@contextmanager
def operation_lock(lock_path: Path, scope: str, operation: str) -> Iterator[None]:
    """Hold the ``operation`` lock for ``scope`` (e.g. the primary repository's location)."""
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    name = f"{operation}-{digest}.lock"
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
