"""wal-fetch: hand an archived WAL file to PostgreSQL's restore_command, or say it is not there.

The file is decoded into a temporary file beside ``dest`` and renamed to ``dest`` only after the
whole frame authenticated, so PostgreSQL never sees a damaged, truncated or foreign file: it
either gets the exact bytes that were archived, or nothing.

"Not archived" is an answer only a repository that is there can give: PostgreSQL takes it for the
end of the archive and opens the database there. So before saying it, the repository's format
object is looked up; without it (an unmounted file system, a moved directory, a missing bucket)
the answer is an error, which aborts recovery instead of losing every later change.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from drkit.errors import DrkitError, ObjectNotFound, repository_missing
from drkit.fsutil import os_reason, write_new
from drkit.repo.wal_names import parse_wal_name

if TYPE_CHECKING:  # "not archived" (every recovery's history files) needs no codecs nor keys
    from drkit.repo.wal_objects import RepoLike, WalKeyring


# The repository's format object (drkit.repo.repository.FORMAT_KEY, without that module's imports)
FORMAT_KEY = "drkit-repository.json"


class WalFetchError(DrkitError):
    """A WAL file cannot be fetched for a reason other than damage or keys (bad name, target)."""


def fetch(repo: RepoLike, name: str, dest: Path, *, keyring: WalKeyring | None = None) -> bool:
    """Writes archived WAL file ``name`` to ``dest`` atomically; False when it is not archived.

    Raises IntegrityError when the archived object is damaged or tampered with (``dest`` is then
    left untouched), a key error when its key cannot be had, StorageError when the repository
    cannot be read, RepositoryMissing when the file is not there because the repository is not
    there, WalFetchError for an invalid name or an unwritable ``dest``.
    """
    try:
        wal = parse_wal_name(name)
    except ValueError as exc:
        raise WalFetchError(str(exc), hint="restore_command = 'drkit wal-fetch %f %p'") from None
    dest = Path(dest)
    try:
        size = repo.storage.stat(wal.key).size
    except ObjectNotFound:
        return _repository_present(repo)
    from drkit.repo.wal_objects import WalKeyring, read_object

    keyring = keyring or WalKeyring(repo, cache=False)
    try:
        # Not synced: PostgreSQL replays the file at once and it is in the archive anyway.
        with write_new(dest, replace=True, sync=False) as out:
            read_object(repo, keyring, wal, out.write, size=size)
    except ObjectNotFound:  # deleted between stat and read
        return _repository_present(repo)
    except OSError as exc:
        raise WalFetchError(f"cannot write WAL file {name} to '{dest}': {os_reason(exc)}") from None
    return True


def _repository_present(repo: RepoLike) -> bool:
    """False (not archived) when the repository is there; RepositoryMissing otherwise."""
    if not repo.storage.exists(FORMAT_KEY):
        raise repository_missing(repo.name, repo.storage.location, reading=True)
    return False
