"""The size of every object of a posix repository, for the metrics, without an lstat per object.

``drkit_repository_size_bytes`` is the sum of every object's size. A directory gives its names
cheaply, but each size is a system call, and 100,000 archived WAL files make that most of a
scrape. Objects are write-once: a key, once listed, keeps its size until it is deleted (a write
never replaces an existing key, and nothing rewrites one in place). So sizes seen once are kept
here, per repository: a scrape lists the names, takes the sizes it knows, and asks only for the
new keys; keys no longer listed are forgotten. The total is exact as long as the repository
keeps that rule.

The sizes are kept in memory (the scheduler's ``/metrics``) and in a file in drkit's private
directory (``lock_path``), for ``drkit metrics --textfile`` run by a timer. A file that is
missing, unreadable or malformed is ignored: the repository is then listed with its sizes, as
without a cache. The file holds object keys and sizes only, nothing secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from drkit.errors import DrkitError, ObjectNotFound
from drkit.private_dir import open_private_dir
from drkit.storage.posix import PosixStorage

log = logging.getLogger(__name__)

# With more new keys than this, one listing with sizes is cheaper than asking for each.
RELIST_ABOVE = 2000


class SizeCache:
    """Sizes of the objects of posix repositories, by location; ``directory``: where they are
    kept between runs (None: in memory only)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._known: dict[str, dict[str, int]] = {}

    def listing(self, storage: PosixStorage) -> tuple[list[str], int]:
        """Every key of ``storage`` (sorted) and the sum of their sizes."""
        location = storage.location
        known = self._known.get(location)
        if known is None:
            known = self._load(location)
        if known is None:
            sizes = _listed(storage)
        else:
            keys = storage.list_keys("")
            missing = [k for k in keys if k not in known]
            if len(missing) > RELIST_ABOVE:
                sizes = _listed(storage)
            else:
                sizes = {k: known[k] for k in keys if k in known}
                for key in missing:
                    try:
                        sizes[key] = storage.stat(key).size
                    except ObjectNotFound:
                        continue  # deleted since it was listed
            if sizes.keys() == known.keys():
                self._known[location] = known
                return sorted(sizes), sum(sizes.values())
        self._known[location] = sizes
        self._store(location, sizes)
        return sorted(sizes), sum(sizes.values())

    def _file(self, location: str) -> str:
        return f"metrics-sizes-{hashlib.sha256(location.encode()).hexdigest()[:16]}.json"

    def _load(self, location: str) -> dict[str, int] | None:
        if self.directory is None:
            return None
        data = self._in_private_dir(lambda fd: _read(fd, self._file(location)))
        if not isinstance(data, dict) or data.get("location") != location:
            return None
        sizes = data.get("sizes")
        if not isinstance(sizes, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in sizes.items()
        ):
            return None
        return sizes

    def _store(self, location: str, sizes: dict[str, int]) -> None:
        if self.directory is None:
            return
        text = json.dumps({"location": location, "sizes": sizes}, separators=(",", ":"))
        self._in_private_dir(lambda fd: _write(fd, self._file(location), text.encode()))

    def _in_private_dir(self, action: Callable[[int], object]) -> object:
        """``action(dir_fd)`` in the private directory; None, logged, when that fails (the
        metrics are then computed without the cache, never wrong)."""
        assert self.directory is not None
        try:
            fd = open_private_dir(self.directory)
        except DrkitError as exc:
            log.info("no size cache for the metrics", extra={"error": exc.message})
            return None
        try:
            return action(fd)
        except (OSError, ValueError) as exc:
            log.info("size cache not used", extra={"error": str(exc)})
            return None
        finally:
            os.close(fd)


def _listed(storage: PosixStorage) -> dict[str, int]:
    return {o.key: o.size for o in storage.list("")}


def _read(dir_fd: int, name: str) -> object:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        if os.fstat(file.fileno()).st_uid != os.geteuid():
            return None  # not drkit's own
        return json.loads(file.read())


def _write(dir_fd: int, name: str, data: bytes) -> None:
    """Replace ``name`` in the private directory: a new file, then a rename over it."""
    temporary = f".{name}.{os.urandom(6).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(temporary, dir_fd=dir_fd)
        raise
