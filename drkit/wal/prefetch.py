"""WAL prefetch: a background fetcher keeps the next segments ready before PostgreSQL asks.

Recovery runs restore_command once per file, one after another, so without help every segment
costs a whole fetch (start-up, download, decryption, decompression) while replay waits. With
``wal-fetch --prefetch`` (the restore_command drkit restore writes) and ``[archive] fetch_ahead
= N`` (0 turns it off), the fetching moves to one background process per recovering cluster:

1. Every request writes its file name to ``<spool>/want``. When a fetcher runs (it holds an
   exclusive ``flock`` on ``<spool>/fetcher.lock``) and has the segment, the request renames it
   to ``%p`` (copies it, when the spool is on another file system) and is done; a segment the
   fetcher is still writing is waited for. The quick path (drkit/wal/quick.py) adds a token to
   its request and has the fetcher fetch what it did not spool; the fetcher answers in
   ``<spool>/answer``.
2. Anything else is fetched directly, exactly as without prefetch. Then, when no fetcher runs,
   the request removes what an earlier one may have left (holding the lock, so none is running)
   and starts ``drkit wal-fetcher`` detached, output in ``<spool>/fetcher.log`` (its pid in
   ``<spool>/started``: while it starts up, the next requests start no other).
3. The fetcher fetches the N segments after the wanted one, lowest first, ``process_max`` at a
   time, each through the same function as a direct fetch: authenticated and decoded, from the
   first repository that serves it intact. A segment appears in the spool under its own name
   only once complete; at most N are spooled or being written at once.

So the spool only ever holds segments that passed every check. A segment that is not archived,
damaged, or unreadable is left out, and PostgreSQL's request for it is a direct fetch, with a
direct fetch's answer: 1 for "not archived", above 125 for damage, which aborts recovery (or,
from the quick path, "not archived" from the fetcher's own look made after the request).
Spooled segments are written out to disk first when the spool shares ``pg_wal``'s file system:
PostgreSQL fsyncs every restored file while replay waits.

The spool is ``<spool_path or lock_path>/fetch-<hash of the data directory>``, a private
directory of the server's user (drkit/private_dir.py). The fetcher stops, removing what it
spooled, when recovery ended (neither ``recovery.signal`` nor ``standby.signal`` is left: a
target reached and promoted, say) or its postmaster is gone; when PostgreSQL asks for a
segment of another timeline (a timeline switch: the next request starts a new fetcher); and
when no request came for ``IDLE`` seconds (recovery paused at its target). A spool that cannot
take more (a full disk, a directory it cannot write) stops the fetching ahead, and the requests
fetch directly.

A spool is left behind for its ``fetcher.log``. Each fetcher, as it starts, removes the other
``fetch-*`` spools beside its own that no fetcher holds and no request touched for ``STALE``
seconds (one is made per restored data directory; drills make many): only the files a spool
holds, never through a link, and the directory only once empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import sys
import time
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from drkit.errors import DrkitError
from drkit.private_dir import open_lock_file, open_private_dir
from drkit.repo.wal_names import parse_wal_name
from drkit.wal.quick import (
    ANSWER_FILE,
    INFO,
    LOCK_FILE,
    PART,
    WANT_FILE,
    in_flight,
    publish,
    read_info,
    ready,
    spool_name,
    wait_ready,
)
from drkit.wal.quick import recovering as _recovering

if TYPE_CHECKING:
    from drkit.wal.config import WalConfig
    from drkit.wal.operation import WalFetchRequest, WalFetchResult

log = logging.getLogger(__name__)

LOG_FILE = "fetcher.log"
STARTED_FILE = "started"  # the pid of the fetcher last started, until it holds the lock
KEEP = (LOCK_FILE, LOG_FILE, WANT_FILE, STARTED_FILE)
IDLE = 10.0  # seconds without a request before the fetcher exits
LOG_LIMIT = 1024 * 1024  # a longer fetcher.log is started afresh
STALE = 3600.0  # seconds after its last request an unlocked spool may be removed
_LONG_HEADER = struct.Struct("<HHIQIxxxxQII")  # XLogLongPageHeaderData: xlp_seg_size is [6]


def spool_path(config: WalConfig, pgdata: Path) -> Path:
    """The fetch spool of the cluster recovering in ``pgdata``."""
    return (config.archive.spool_path or config.lock_path) / spool_name(str(pgdata.resolve()))


def recovering(pgdata: Path) -> bool:
    """A server runs in ``pgdata`` and has not finished its recovery."""
    return _recovering(str(pgdata))


class FetchSpool:
    """The spool directory of one recovering cluster, opened and checked (private, ours)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_private_dir(path)

    def close(self) -> None:
        os.close(self.fd)

    def open(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)

    def write(self, name: str, text: str) -> None:
        """Publish ``name`` whole (a temporary file renamed over it)."""
        publish(self.fd, name, text)

    def read(self, name: str) -> str | None:
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd) as file:
            return file.read()

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def ready(self, name: str) -> bool:
        """A complete segment this user wrote (never anything else, never through a link)."""
        return ready(self.fd, name)

    def in_flight(self, name: str) -> bool:
        return in_flight(self.fd, name)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def clear(self, keep: Collection[str] = KEEP) -> None:
        for name in self.names():
            if name not in keep:
                self.remove(name)

    def try_lock(self) -> int | None:
        """The fetcher lock's descriptor if this process got it, None if a fetcher holds it."""
        fd = open_lock_file(self.fd, self.path, LOCK_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def remove_stale_spools(current: Path) -> None:
    """Remove the spools beside ``current`` that are stale (see the module docstring). A spool
    another user owns, a link, or one holding anything a spool does not hold is left alone."""
    root = current.parent
    try:
        names = [n for n in os.listdir(root) if n.startswith("fetch-") and n != current.name]
    except OSError:
        return
    for name in names:
        path = root / name
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or time.time() - st.st_mtime < STALE:
                continue
            spool = FetchSpool(path)
        except (DrkitError, OSError):
            continue
        try:
            _remove_spool(spool)
        except (DrkitError, OSError) as exc:
            reason = exc.message if isinstance(exc, DrkitError) else (exc.strerror or str(exc))
            log.warning("stale spool '%s' not removed: %s", path, reason)
        finally:
            spool.close()


def _remove_spool(spool: FetchSpool) -> None:
    if not all(_spool_file(spool, n) for n in spool.names()):
        return  # checked before the lock file could be made in it
    lock = spool.try_lock()  # held while emptying it: no fetcher starts in it meanwhile
    if lock is None:
        return
    try:
        names = spool.names()
        if not all(_spool_file(spool, n) for n in names):
            return
        for name in names:
            if name != LOCK_FILE:
                spool.remove(name)
        spool.remove(LOCK_FILE)
        with contextlib.suppress(OSError):  # a request wrote into it meanwhile: left for later
            os.rmdir(spool.path)
            log.info("removed stale spool '%s'", spool.path)
    finally:
        os.close(lock)


def _spool_file(spool: FetchSpool, name: str) -> bool:
    """``name`` is a regular file of this user with a name drkit gives spool files."""
    if not spool.ready(name):
        return False
    if name in (*KEEP, ANSWER_FILE) or (name.startswith(".") and name.endswith(".tmp")):
        return True
    base = name.lstrip(".").split(PART, 1)[0].removesuffix(INFO)
    try:
        return parse_wal_name(base).kind in ("segment", "history")
    except ValueError:
        return False


# -- the restore_command side ----------------------------------------------------------------------


class Prefetch:
    """What one wal-fetch does with the spool: take its segment, or start a fetcher."""

    def __init__(self, config: WalConfig, request: WalFetchRequest) -> None:
        self.config, self.request = config, request
        self.pgdata = Path.cwd()  # restore_command runs in the data directory
        self.spool: FetchSpool | None = None
        if not recovering(self.pgdata):
            return  # run by hand, not by a recovering server: nothing to fetch ahead for
        try:
            self.spool = FetchSpool(spool_path(config, self.pgdata))
            self.spool.write(WANT_FILE, request.name + "\n")
        except (DrkitError, OSError) as exc:
            self._off(exc)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.spool is not None:
            self.spool.close()

    def _off(self, exc: DrkitError | OSError) -> None:
        reason = exc.message if isinstance(exc, DrkitError) else (exc.strerror or str(exc))
        log.warning("not fetching WAL ahead: %s", reason, extra={"command": "wal-fetch"})
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def take(self) -> WalFetchResult | None:
        """The result of renaming the spooled segment into place, or None (fetch directly)."""
        spool, name = self.spool, self.request.name
        if spool is None:
            return None
        try:
            if _no_fetcher(spool) or not wait_ready(spool.fd, name, lambda: _no_fetcher(spool)):
                return None
            return self._serve(spool, name)
        except (DrkitError, OSError) as exc:
            self._off(exc)
            return None

    def _serve(self, spool: FetchSpool, name: str) -> WalFetchResult | None:
        from drkit.errors import CopyFallback
        from drkit.wal.operation import WalFetchResult

        info = read_info(spool.fd, name)
        dest = self.request.dest
        try:
            os.rename(name, dest, src_dir_fd=spool.fd)
        except FileNotFoundError:
            return None  # the fetcher stopped and took it away: fetch directly
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy(spool, name, dest)
        spool.remove(name + INFO)
        result = WalFetchResult(name=name, fetched=True, repo=info[0] or None, prefetched=True)
        result.searched.append(info[0])
        result.warnings += [CopyFallback(line) for line in info[1:] if line]
        return result

    @staticmethod
    def _copy(spool: FetchSpool, name: str, dest: Path) -> None:
        import shutil

        from drkit.fsutil import write_new

        with (
            os.fdopen(spool.open(name, os.O_RDONLY), "rb") as source,
            write_new(dest, replace=True, sync=False) as out,
        ):
            shutil.copyfileobj(source, out, 1024 * 1024)
        spool.remove(name)

    def start(self, result: WalFetchResult) -> None:
        """After a direct fetch: start a fetcher unless one runs, for a segment written."""
        spool = self.spool
        if spool is None or not result.fetched or parse_wal_name(result.name).kind != "segment":
            return
        try:
            segment_size = _segment_size(self.request.dest)
            if segment_size is not None and _no_fetcher(spool) and not _starting(spool):
                spool.write(STARTED_FILE, f"{self._spawn(spool, segment_size)}\n")
        except (DrkitError, OSError) as exc:
            self._off(exc)

    def _spawn(self, spool: FetchSpool, segment_size: int) -> int:
        import subprocess

        from drkit.logs import open_log_file

        command = [sys.executable, "-m", "drkit", "wal-fetcher"]
        command += ["--config", str(self.config.config_path.absolute())]
        command += ["--pgdata", str(self.pgdata), "--segment-size", str(segment_size)]
        if self.request.recovery_key is not None:
            command += ["--recovery-key", str(self.request.recovery_key.absolute())]
        for repo in self.request.repos or []:
            command += ["--repo", repo]
        with contextlib.suppress(FileNotFoundError):
            if os.stat(LOG_FILE, dir_fd=spool.fd, follow_symlinks=False).st_size > LOG_LIMIT:
                spool.remove(LOG_FILE)
        with open(open_log_file(spool.path / LOG_FILE), "ab") as output:
            return subprocess.Popen(  # noqa: S603 - this interpreter running drkit, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,  # outlives this request, away from the server's signals
                close_fds=True,
            ).pid


def _starting(spool: FetchSpool) -> bool:
    """A fetcher was started and is still starting up (not yet holding the lock): the
    requests meanwhile start no other."""
    pid = (spool.read(STARTED_FILE) or "").strip()
    return pid.isdigit() and alive(int(pid))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, another user's
        return True
    return True


def _no_fetcher(spool: FetchSpool) -> bool:
    """True when no fetcher runs; what the spool holds is then a dead one's, and is removed
    while the lock is held (no fetcher can start meanwhile)."""
    lock = spool.try_lock()
    if lock is None:
        return False
    try:
        spool.clear()
    finally:
        os.close(lock)
    return True


def _segment_size(path: Path) -> int | None:
    """xlp_seg_size from the long page header of the segment just written at ``path``."""
    with open(path, "rb") as file:
        head = file.read(_LONG_HEADER.size)
    if len(head) < _LONG_HEADER.size:
        return None
    size = _LONG_HEADER.unpack(head)[6]
    return size if 1 << 20 <= size <= 1 << 30 and size & (size - 1) == 0 else None
