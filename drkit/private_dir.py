"""Directories drkit reuses between runs (locks, the WAL spool) and the files it keeps in them.

Such a directory outlives the process that made it, so another local user may have made it
first, or may replace what is in it. drkit therefore never trusts one by name: it opens the
directory itself without following a link, checks that the user drkit runs as owns it and that
neither group nor others can write to it, and opens every file in it relative to that check
(``dir_fd``) and with ``O_NOFOLLOW``. A lock file is never truncated: a planted link or hard link
would otherwise let the next run empty a file of the attacker's choosing (pg_control, say).

Default location (``lock_path``): ``/run/drkit`` for root, ``~/.drkit`` (the home directory of
the user drkit runs as, e.g. ``/var/lib/postgresql/.drkit``) for anyone else. Both are created
0700 and belong to that user alone; ``/tmp`` is never a default.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from drkit.errors import DrkitError, UnsafePathError

_HINT = (
    "remove it, or set lock_path (or [archive] spool_path) to a directory that only the user"
    " drkit runs as owns and can write (mode 0700)"
)


def default_lock_path() -> Path:
    """``/run/drkit`` for root, ``<home>/.drkit`` for any other user."""
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/drkit")
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = os.environ.get("HOME", "")
    return Path(home or "/nonexistent") / ".drkit"


def open_private_dir(path: Path) -> int:
    """A descriptor of directory ``path`` (created 0700, parents too, when missing), refused
    with UnsafePathError when it is a link, not a directory, owned by another user or writable
    by group or others. The caller closes it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling link: the open below says which
    except OSError as exc:
        raise DrkitError(
            f"cannot create directory '{path}': {(exc.strerror or str(exc)).lower()}",
            hint="set lock_path (or [archive] spool_path) to a directory the user drkit runs as"
            " can create",
        ) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if path.is_symlink() else "not a directory"
            raise UnsafePathError(f"refusing to use '{path}': it is {what}", hint=_HINT) from None
        raise DrkitError(
            f"cannot open directory '{path}': {(exc.strerror or str(exc)).lower()}"
        ) from None
    try:
        _check_owned(os.fstat(fd), path, "directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock_file(dir_fd: int, directory: Path, name: str) -> int:
    """Open (or create, 0600) lock file ``name`` in the checked directory ``dir_fd`` for reading
    and writing, never following a link and never truncating it; refused unless it is a regular
    file of this user with one link."""
    path = directory / name
    try:
        fd = os.open(
            name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                f"refusing to use lock file '{path}': it is a symbolic link", hint=_HINT
            ) from None
        raise DrkitError(
            f"cannot open lock file '{path}': {(exc.strerror or str(exc)).lower()}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise UnsafePathError(
                f"refusing to use lock file '{path}': it is not a plain file of its own"
                " (another kind of file, or a hard link)",
                hint=_HINT,
            )
        _check_owned(st, path, "lock file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_pid(fd: int) -> None:
    """Record this process in a held lock file without truncating it: the pid, padded to a
    width no earlier pid reaches, so what a previous holder wrote is fully overwritten."""
    os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)


def _check_owned(st: os.stat_result, path: Path, what: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafePathError(
            f"refusing to use {what} '{path}': it is owned by {_user(st.st_uid)}, not by"
            f" {_user(uid)} that drkit runs as",
            hint=_HINT,
        )
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"refusing to use {what} '{path}': it is writable by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod go-w '{path}', or {_HINT}",
        )


def _user(uid: int) -> str:
    try:
        return f"'{pwd.getpwuid(uid).pw_name}'"
    except KeyError:
        return f"uid {uid}"
