"""Small filesystem helpers shared by the modules that write durably (storage, keys, spool)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


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


def os_reason(exc: OSError) -> str:
    """'no space left on device': the OS's words, lowercase, for one-line messages."""
    return (exc.strerror or str(exc)).lower()
