"""Where a restore writes: only inside the target directory and the tablespace directories the
operator confirmed, never through a link, files owned by the target's owner.

Every directory of the manifest is created by the restore itself (``mkdir`` relative to its
parent's descriptor) and kept open; every file is created relative to its directory's descriptor
with ``O_NOFOLLOW``. Nothing is ever resolved by name from the target's root, so neither a link in
the backup (refused anyway, repo/safety.py) nor one someone slips into the target while the
restore runs can redirect a write. The only links followed are the ``pg_tblspc/<oid>`` links the
restore makes, and those are not followed either: their directories are opened directly.

Ownership comes from the target, never from the manifest: the cluster runs as the user who owns
the target directory (or, when it does not exist yet, its nearest existing parent), as
PostgreSQL itself demands of a data directory. Run as root, the restore gives every file to that
user; it refuses a target that root owns (PostgreSQL never runs as root). Run as anyone else, it
refuses an existing target owned by another user (and creates a new one as that caller).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drkit.errors import RestoreTargetError
from drkit.fsutil import sync_filesystems
from drkit.pg.layout import restored_mode

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ClusterUser:
    """The user the restored cluster runs as, who owns every restored file."""

    name: str
    uid: int
    gid: int


def cluster_user(pgdata: Path, tablespaces: dict[int, Path]) -> ClusterUser:
    """Run as root: the owner of ``pgdata`` (or of its nearest existing parent), refused when
    that is root. Run as another user: that user, refusing an existing ``pgdata`` owned by
    someone else. Tablespace directories that exist must belong to the same user."""
    existing = pgdata
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    st = os.stat(existing)
    uid = st.st_uid
    me = os.geteuid()
    if me == 0 and uid == 0:
        raise RestoreTargetError(
            f"unable to restore to path '{pgdata}' because '{existing}' is owned by root, and"
            " PostgreSQL does not run as root",
            hint=f"give '{existing}' to the user the cluster will run as (e.g. chown postgres:"
            f" '{existing}'), or restore into a directory that user owns",
        )
    if me != 0 and existing == pgdata and uid != me:
        raise RestoreTargetError(
            f"unable to restore to path '{pgdata}' because '{existing}' is owned by"
            f" {_name(uid)}, not by {_name(me)} that runs the restore",
            hint="restore as the user the cluster will run as, into a directory that user owns",
        )
    if me != 0:
        uid = me  # the caller creates what does not exist yet, and owns it
    try:
        entry = pwd.getpwuid(uid)
        user = ClusterUser(entry.pw_name, uid, entry.pw_gid)
    except KeyError:
        user = ClusterUser(str(uid), uid, st.st_gid)
    for directory in tablespaces.values():
        if directory.exists() and directory.stat().st_uid != uid:
            raise RestoreTargetError(
                f"unable to restore a tablespace to '{directory}' because it is owned by"
                f" {_name(directory.stat().st_uid)}, not by {_name(uid)}, the cluster's user",
                hint="give the tablespace directory to the user the cluster will run as",
            )
    return user


def _name(uid: int) -> str:
    try:
        return f"'{pwd.getpwuid(uid).pw_name}'"
    except KeyError:
        return f"uid {uid}"


class TreeStopped(Exception):
    """A worker reached the target after ``TargetTree.stop()``: its task was abandoned (the
    restore was interrupted), so nobody reads this."""


class TargetTree:
    """The restored cluster's directories, each open, created by this restore."""

    def __init__(self, pgdata: Path, tablespaces: dict[int, Path], user: ClusterUser) -> None:
        self.pgdata = pgdata
        self._tablespaces = tablespaces
        self._user = user
        # Run as root, what the tree creates is given to the cluster's user as it is created
        self._owner = (user.uid, user.gid) if os.geteuid() == 0 else None
        self._fds: dict[str, int] = {}  # '' is PGDATA; 'pg_tblspc/<oid>' a tablespace directory
        self._created: list[Path] = []  # directories make() created above the backup's own
        # Opens and unlinks in progress, and whether stop() closed the tree to them
        self._users = 0
        self._stopped = False
        self._changed = threading.Condition()

    @property
    def root(self) -> int:
        return self._fds[""]

    @property
    def made(self) -> bool:
        """Whether ``make`` opened the data directory (``root`` is there)."""
        return "" in self._fds

    def make(self, directories: list[tuple[str, int]]) -> None:
        """Create PGDATA (0700), the tablespace directories and their pg_tblspc links, then
        ``directories`` ((path, recorded mode), parents first) with the modes PostgreSQL uses."""
        self._fds[""] = self._open_made(self.pgdata, 0o700)
        tblspc = self._mkdir_at(self.root, "pg_tblspc", 0o700)
        self._fds["pg_tblspc"] = tblspc
        for oid, target in self._tablespaces.items():
            self._fds[f"pg_tblspc/{oid}"] = self._open_made(target, 0o700)
            os.symlink(target, str(oid), dir_fd=tblspc)
            if self._owner is not None:
                os.chown(str(oid), *self._owner, dir_fd=tblspc, follow_symlinks=False)
        for path, mode in sorted(directories):
            if path in self._fds:
                os.fchmod(self._fds[path], restored_mode(mode, True))
                continue
            parent, name = self._parent(path)
            self._fds[path] = self._mkdir_at(parent, name, restored_mode(mode, True))

    def ensure_dir(self, path: str) -> None:
        """Create directory ``path`` (0700) unless the backup already made it."""
        if path not in self._fds:
            parent, name = self._parent(path)
            self._fds[path] = self._mkdir_at(parent, name, 0o700)

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """A descriptor of file ``path``, opened in its directory without following a link (and
        with O_CREAT, run as root, given to the cluster's user); TreeStopped after ``stop()``."""
        with self._in_use():
            parent, name = self._parent(path)
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        if flags & os.O_CREAT and self._owner is not None:
            try:
                os.fchown(fd, *self._owner)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def unlink(self, path: str) -> None:
        with self._in_use():
            parent, name = self._parent(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)

    def remove_created(self) -> None:
        """Remove the directories ``make`` created for PGDATA and the tablespaces (and their
        parents it created), once emptied: an undone restore leaves no directory the next
        restore would refuse (made by root, it would not belong to the cluster's user)."""
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def stop(self) -> None:
        """Close the tree to the restore's workers before what they wrote is removed: once this
        returns no open or unlink is in progress and every later one raises TreeStopped, so an
        abandoned worker (an interrupted restore does not wait for them) creates nothing in the
        target again, and none uses a directory descriptor ``close()`` gave back. (What it
        still writes through a descriptor it holds goes to a file already unlinked, or in a
        delta restore to one compared again by the next restore.)"""
        with self._changed:
            self._stopped = True
            self._changed.wait_for(lambda: self._users == 0)

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._changed:
            if self._stopped:
                raise TreeStopped
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                if not self._users:
                    self._changed.notify_all()

    def finish_file(self, path: str, mode: int, mtime: float) -> None:
        """Give a written file the mode PostgreSQL uses and its recorded mtime."""
        fd = self.open(path, os.O_RDONLY)
        try:
            finish_open(fd, mode, mtime)
        finally:
            os.close(fd)

    def set_ownership(self, *, kept: bool = False) -> None:
        """Run as root, give everything restored to the cluster's user (links included, never
        followed). What the tree created is theirs already, given as it was created. ``kept``:
        most entries were kept from an earlier restore (a delta restore), so everything below
        the roots is walked (fwalk stays on the descriptors it opened) and those another user
        owns are changed (a chown, even to the same owner, dirties the inode for the final
        sync); else only the roots' own entries are given (the recovery settings, written
        beside the tree)."""
        if self._owner is None:
            return
        uid, gid = self._owner
        for root in self._roots():
            os.fchown(root, uid, gid)
            if not kept:
                for name in os.listdir(root):
                    os.chown(name, uid, gid, dir_fd=root, follow_symlinks=False)
                continue
            for _, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=root):
                for name in dirnames + filenames:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if (st.st_uid, st.st_gid) == (uid, gid):
                        continue
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def sync(self) -> None:
        """Make every file restored durable (one call per file system: no fsync per file)."""
        sync_filesystems(self._roots())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _roots(self) -> list[int]:
        """PGDATA and the tablespace directories."""
        return [self.root, *(self._fds[f"pg_tblspc/{oid}"] for oid in self._tablespaces)]

    def _parent(self, path: str) -> tuple[int, str]:
        parent, _, name = path.rpartition("/")
        return self._fds[parent], name

    def _mkdir_at(self, parent: int, name: str, mode: int) -> int:
        # An existing entry is opened without following below: a link or a file is refused
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        os.fchmod(fd, mode)
        if self._owner is not None:
            os.fchown(fd, *self._owner)
        return fd

    def _open_made(self, path: Path, mode: int) -> int:
        """Create ``path`` (and parents) unless it exists, noting what it created, then open it
        without following a final link: the directories given by the operator are trusted up
        to their last component."""
        missing = [path, *path.parents]
        missing = missing[: next(i for i, p in enumerate(missing) if p.exists())]
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        self._created += reversed(missing)
        return _open_dir(path, mode)


def finish_open(fd: int, mode: int, mtime: float, created: int | None = None) -> None:
    """``finish_file`` on a descriptor of the file, open for writing, after its last write.
    ``created``: the mode the file was just created with (O_CREAT | O_EXCL); when the umask
    left it the restored mode, no fchmod (one system call less per file)."""
    wanted = restored_mode(mode, False)
    if created is None or created & ~_UMASK != wanted:
        os.fchmod(fd, wanted)
    os.utime(fd, (mtime, mtime))


def _umask() -> int:
    """The process's umask, from /proc: os.umask() reads it only by changing it, which would
    race with files other threads create. Unknown: 0o777, so every mode is set explicitly."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777


_UMASK = _umask()  # drkit never changes it


def _open_dir(path: Path, mode: int) -> int:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise RestoreTargetError(
            f"unable to restore to '{path}': {(exc.strerror or str(exc)).lower()}",
            hint="give a plain directory, not a symbolic link",
        ) from None
    os.fchmod(fd, mode)
    return fd
