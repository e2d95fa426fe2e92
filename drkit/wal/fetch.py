"""wal-fetch: hand an archived WAL file to PostgreSQL's restore_command, or say it is not there.

The file is decoded into a temporary file beside ``dest`` and renamed to ``dest`` only after the
whole frame authenticated, so PostgreSQL never sees a damaged, truncated or foreign file: it
either gets the exact bytes that were archived, or nothing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from drkit.errors import DrkitError, ObjectNotFound
from drkit.fsutil import os_reason
from drkit.repo.wal_names import parse_wal_name
from drkit.repo.wal_objects import RepoLike, WalKeyring, read_object


class WalFetchError(DrkitError):
    """A WAL file cannot be fetched for a reason other than damage or keys (bad name, target)."""


def fetch(repo: RepoLike, name: str, dest: Path, *, keyring: WalKeyring | None = None) -> bool:
    """Writes archived WAL file ``name`` to ``dest`` atomically; False when it is not archived.

    Raises IntegrityError when the archived object is damaged or tampered with (``dest`` is then
    left untouched), a key error when its key cannot be had, StorageError when the repository
    cannot be read, WalFetchError for an invalid name or an unwritable ``dest``.
    """
    try:
        wal = parse_wal_name(name)
    except ValueError as exc:
        raise WalFetchError(str(exc), hint="restore_command = 'drkit wal-fetch %f %p'") from None
    dest = Path(dest)
    try:
        size = repo.storage.stat(wal.key).size
    except ObjectNotFound:
        return False
    keyring = keyring or WalKeyring(repo, cache=False)
    temporary = dest.parent / f".{dest.name}.drkit-{os.getpid()}-{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise WalFetchError(
            f"cannot create '{temporary}' to fetch WAL file {name}: {os_reason(exc)}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                read_object(repo, keyring, wal, out.write, size=size)
            except ObjectNotFound:  # deleted between stat and read
                return False
        os.replace(temporary, dest)
    except OSError as exc:
        raise WalFetchError(f"cannot write WAL file {name} to '{dest}': {os_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return True
