"""Host-local operation locks: two backups of one cluster never run at once.

A backup runs where PGDATA is, so a kernel lock (flock) on a file in ``lock_path`` is exact: it
is released when the process dies, however it dies, so a kill -9 never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drkit.errors import LockError


@contextmanager
def operation_lock(lock_path: Path, scope: str, operation: str) -> Iterator[None]:
    """Hold the ``operation`` lock for ``scope`` (e.g. the primary repository's location)."""
    lock_path.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    path = lock_path / f"{operation}-{digest}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockError(
                f"another {operation} is already running for '{scope}' (pid {holder})",
                hint=f"wait for it to finish; the lock is '{path}'",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
