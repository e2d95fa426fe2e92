"""Asynchronous WAL archiving: a background pusher that pushes ahead, a spool of status files.

With ``[archive] async = true`` the archive_command (``drkit wal-push %p``) does not push itself:

1. If the spool holds ``<name>.ok`` for its file (and the file is the one that was pushed: same
   inode, size and mtime), it removes it and exits 0; ``<name>.error`` is printed, removed, and the
   command exits with the code it holds, so PostgreSQL retries later.
2. Otherwise it makes sure one pusher runs: the pusher holds an exclusive ``flock`` on
   ``<spool>/pusher.lock`` for its lifetime (the kernel releases it when the process dies, however
   it dies). If the lock is free, it starts ``drkit wal-pusher`` detached (a new session, so it
   outlives the archive_command and ignores the terminal's signals), output in ``pusher.log``.
3. It waits, at most ``push_timeout`` seconds, for its ``.ok`` or ``.error``; a pusher that exits
   without answering is started again (up to three times), then the command fails.

The pusher scans ``<pgdata>/pg_wal/archive_status/*.ready`` and pushes every ready file with
``process_max`` threads — ahead of PostgreSQL, which asks for one file at a time. It writes
``<name>.ok`` (fsynced, renamed into place, directory fsynced) only after the object is durable in
the repository, so the archive_command never returns 0 before its file is stored. It writes
``<name>.error`` (exit code, then the message) when a push fails, and retries that file only after
the error was handed to PostgreSQL. It keeps each period's data key in memory. When nothing has
been ready for ``idle`` seconds it exits; after ten minutes, or when the configuration file
changed, it finishes what it started and exits, so that new settings, keys or drkit versions are
picked up by the pusher the next archive_command starts. Status files whose ``.ready`` is gone are
stale (the file was archived another way) and are removed when a pusher starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from drkit.errors import DrkitError
from drkit.fsutil import fsync_dir, os_reason
from drkit.logs import open_log_file
from drkit.private_dir import open_lock_file, open_private_dir, write_pid
from drkit.repo.wal_names import file_identity, is_wal_name
from drkit.wal.config import WalConfig
from drkit.wal.errors import AsyncPushError, WalSourceError

if TYPE_CHECKING:  # the archive_command side imports neither: it only waits
    import subprocess
    from collections.abc import Callable
    from concurrent.futures import Future

    from drkit.config.settings import Settings
    from drkit.wal.push import PushResult

log = logging.getLogger(__name__)

__all__ = ["AsyncPushError", "Spool", "push_async", "run_pusher"]

OK = ".ok"
ERROR = ".error"
LOCK_FILE = "pusher.lock"
LOG_FILE = "pusher.log"
LOG_LIMIT = 1024 * 1024
MAX_SPAWNS = 3
DEFAULT_IDLE = 5.0
MAX_LIFETIME = 600.0  # seconds a pusher takes new work; then the next one takes over


class Spool:
    """The status directory shared by the archive_command calls and the pusher of one cluster."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the spool (0700) or check it is private: this user's, written by no one else
        and not a link (drkit/private_dir.py); every file in it is then opened without
        following links."""
        os.close(open_private_dir(self.path))

    def status_path(self, name: str, suffix: str) -> Path:
        return self.path / f"{name}{suffix}"

    def write_status(self, name: str, suffix: str, text: str) -> None:
        """Atomically and durably publish ``<name><suffix>``."""
        final = self.status_path(name, suffix)
        temporary = self.path / f".{name}{suffix}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
        fsync_dir(self.path)

    def take(self, name: str, identity: str) -> tuple[str, str] | None:
        """Consume the status of ``name``: ("ok", text) or ("error", text), or None."""
        ok = self.status_path(name, OK)
        text = _read(ok)
        if text is not None:
            with contextlib.suppress(FileNotFoundError):
                ok.unlink()
            if text.split("\n", 1)[0] == identity:
                return "ok", text
            # Pushed from another file of that name (a stale status): it says nothing of this one.
        error = self.status_path(name, ERROR)
        text = _read(error)
        if text is not None:
            with contextlib.suppress(FileNotFoundError):
                error.unlink()
            return "error", text
        return None

    def has(self, name: str, suffix: str) -> bool:
        return self.status_path(name, suffix).exists()

    def try_lock(self) -> int | None:
        """The pusher lock's descriptor if this process got it, None if a pusher holds it."""
        dir_fd = open_private_dir(self.path)
        try:
            fd = open_lock_file(dir_fd, self.path, LOCK_FILE)
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        write_pid(fd)
        return fd

    def pusher_running(self) -> bool:
        fd = self.try_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def remove_stale(self, ready: set[str]) -> None:
        for entry in os.scandir(self.path):
            name, dot, suffix = entry.name.rpartition(".")
            stale = entry.name.startswith(".") and entry.name.endswith(".tmp")
            stale |= dot == "." and f".{suffix}" in (OK, ERROR) and name not in ready
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


# -- the archive_command side ---------------------------------------------------------------------


def push_async(config: WalConfig, path: Path) -> bool:
    """Returns True once the pusher stored ``path``; raises AsyncPushError (or a DrkitError) if
    it failed. Returns False, having done nothing, for a file PostgreSQL did not mark ready (run
    by hand, say), which the pusher would never see: the caller pushes that one itself."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise WalSourceError(f"WAL file '{path}' does not exist") from None
    wal_dir = config.pgdata / "pg_wal"
    try:
        same_dir = os.path.samefile(path.parent if str(path.parent) else ".", wal_dir)
    except OSError:
        same_dir = False
    if not same_dir:
        raise DrkitError(
            f"WAL file '{path}' is not in '{wal_dir}', where the async pusher looks",
            hint="set postgres.pgdata to this cluster's data directory, or [archive] async = false",
        )
    if not (wal_dir / "archive_status" / f"{path.name}.ready").exists():
        return False
    spool = Spool(config.spool_path)
    spool.ensure()
    try:
        return _wait_for_pusher(config, spool, path.name, file_identity(st))
    except OSError as exc:  # the spool's file system: full, read-only, failing
        raise AsyncPushError(
            f"cannot use the async WAL spool '{spool.path}': {os_reason(exc)}; PostgreSQL will"
            " retry",
            exit_code=8,
            hint=f"free space in '{spool.path}' or set [archive] async = false",
        ) from None


def _wait_for_pusher(config: WalConfig, spool: Spool, name: str, identity: str) -> bool:
    """Have a pusher running and wait for its answer on ``name``."""
    deadline = time.monotonic() + config.archive.push_timeout
    child: subprocess.Popen[bytes] | None = None
    spawns = 0
    delay = 0.001
    next_check = 0.0  # when to look at the pusher again (its lock costs three system calls)
    while True:
        status = spool.take(name, identity)
        if status is not None:
            kind, text = status
            if kind == "ok":
                return True
            code, _, message = text.partition("\n")
            raise AsyncPushError(
                message.strip() or "the async pusher failed", int(code) if code.isdigit() else 2
            )
        now = time.monotonic()
        if now < next_check:
            pass
        elif (child is not None and child.poll() is None) or spool.pusher_running():
            next_check = now + 0.1
        else:
            if spawns == MAX_SPAWNS:
                raise AsyncPushError(
                    f"the async WAL pusher exited {spawns} times without pushing {name}",
                    hint=f"see '{spool.path / LOG_FILE}'",
                )
            child = _spawn_pusher(config, spool)
            spawns += 1
            next_check = now + 0.1
        if now > deadline:
            raise AsyncPushError(
                f"timed out after {config.archive.push_timeout:g}s waiting for the async WAL"
                f" pusher to store {name}; PostgreSQL will retry",
                exit_code=8,
                hint="a slow or unreachable repository? raise [archive] push_timeout or"
                f" process_max; see '{spool.path / LOG_FILE}'",
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.002)


def _spawn_pusher(config: WalConfig, spool: Spool) -> subprocess.Popen[bytes]:
    import subprocess

    log_path = spool.path / LOG_FILE
    with contextlib.suppress(FileNotFoundError):
        if log_path.stat().st_size > LOG_LIMIT:
            log_path.unlink()
    with open(open_log_file(log_path), "ab") as output:  # append-only, never through a symlink
        return subprocess.Popen(  # noqa: S603 - this interpreter running drkit, no shell
            [
                sys.executable,
                "-m",
                "drkit",
                "wal-pusher",
                "--config",
                str(config.config_path.absolute()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            close_fds=True,
        )


# -- the pusher -----------------------------------------------------------------------------------


def ready_names(status_dir: Path) -> list[str]:
    """Names PostgreSQL marked ready for archiving, timeline history files first, then in order."""
    try:
        names = [e.name[:-6] for e in os.scandir(status_dir) if e.name.endswith(".ready")]
    except FileNotFoundError:
        return []
    return sorted(
        (n for n in names if is_wal_name(n)), key=lambda n: (not n.endswith(".history"), n)
    )


def run_pusher(
    config: WalConfig, *, copy_settings: Callable[[], Settings], idle: float = DEFAULT_IDLE
) -> int:
    """The background pusher's main loop; returns when idle (or at once if one already runs).
    ``copy_settings`` gives the full settings the WAL copies to the other repositories need; it
    is called once, when the pusher is idle, so the first push never waits for that loader."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from drkit.repo.wal_objects import WalKeyring
    from drkit.wal.push import Pusher, PushOptions

    spool = Spool(config.spool_path)
    spool.ensure()
    lock = spool.try_lock()
    for _ in range(5):  # an archive_command probing the lock holds it for an instant
        if lock is not None:
            break
        time.sleep(0.01)
        lock = spool.try_lock()
    if lock is None:
        return 0  # another pusher runs
    try:
        wal_dir = config.pgdata / "pg_wal"
        status_dir = wal_dir / "archive_status"
        spool.remove_stale(set(ready_names(status_dir)))
        repo = config.open_repository()
        options = PushOptions(config.archive.key_period, config.archive.compress_level)
        pusher = Pusher(repo, options, WalKeyring(repo, cache=True))
        workers = config.archive.process_max
        inflight: dict[str, Future[PushResult]] = {}
        done: dict[str, str] = {}  # name -> identity of the file pushed
        idle_since = started = time.monotonic()
        config_stamp = _stamp(config.config_path)
        with ThreadPoolExecutor(workers, thread_name_prefix="wal-push") as pool:
            while True:
                # A pusher that has run for long, or whose configuration changed, takes no new
                # work: it finishes what it started and exits, and the next archive_command
                # starts a fresh one (new settings, keys, or drkit version).
                draining = (
                    time.monotonic() - started > MAX_LIFETIME
                    or _stamp(config.config_path) != config_stamp
                )
                ready = [] if draining else ready_names(status_dir)
                for name in set(done) - set(ready):
                    del done[name]  # PostgreSQL has its answer and marked it .done
                for name in ready:
                    if len(inflight) >= 2 * workers:
                        break
                    if name in inflight or spool.has(name, ERROR):
                        continue
                    if name in done:
                        if _identity(wal_dir / name) in (done[name], None):
                            continue  # pushed; waiting for PostgreSQL to take the answer
                    elif spool.has(name, OK):
                        continue  # pushed by an earlier pusher
                    inflight[name] = pool.submit(pusher.push, wal_dir / name)
                finished = [name for name, future in inflight.items() if future.done()]
                for name in finished:
                    _report(spool, name, inflight.pop(name), done)
                if inflight or finished:
                    idle_since = time.monotonic()
                elif draining or time.monotonic() - idle_since > idle:
                    replicate_wal(copy_settings)
                    return 0
                if inflight:
                    wait(inflight.values(), timeout=0.5, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(0.02)
    finally:
        os.close(lock)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _identity(path: Path) -> str | None:
    try:
        return file_identity(os.stat(path))
    except FileNotFoundError:
        return None


def _report(spool: Spool, name: str, future: Future[PushResult], done: dict[str, str]) -> None:
    try:
        result = future.result()
    except DrkitError as exc:
        message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        spool.write_status(name, ERROR, f"{exc.exit_code}\n{_one_line(message)}\n")
        return
    except Exception as exc:  # a bug must not kill the pusher: report it like any failure
        spool.write_status(name, ERROR, f"2\nunexpected error pushing {name}: {exc!r}\n")
        return
    spool.write_status(name, OK, f"{result.identity}\n{'stored' if result.stored else 'exists'}\n")
    done[name] = result.identity


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def replicate_wal(copy_settings: Callable[[], Settings]) -> None:
    """Before the pusher exits (idle), copy the new WAL to the other repositories: the primary
    is written synchronously, the others follow within one pusher lifetime. Best effort: a
    repository that is down is caught up later (by the next pusher, a backup's fan-out or
    'drkit replicate'); 'drkit info' shows the lag."""
    from drkit.repo.copies import CopyService

    try:
        settings = copy_settings()
        if len(settings.repo) < 2:
            return
        report = CopyService(settings, labels=[]).catch_up()  # WAL only, no backups
    except DrkitError as exc:
        log.warning("WAL not replicated: %s", exc.message)
        return
    for repo in report.repos:
        if repo.error:
            log.warning("WAL not replicated to '%s': %s", repo.repo, repo.error)
