"""Delta restore: bring an existing data directory to a backup's exact state, writing only what
differs from it.

A stale copy (a failed primary, a lagging standby, a drill's kept sandbox) already holds most of
the backup's bytes. The delta walks it without following any link and removes every entry the
backup does not have (a link is removed, never followed; a directory goes with its contents).
Each remaining file is compared with its manifest entry: a file of another size or checksum is
written again; a large file stored in chunks, each with its own checksum, has only its differing
chunks written. A file kept is proven by its checksum just as a written one is, so the result
carries the same guarantee as a restore into an empty directory. (Unless the caller asks to trust
timestamps: then files are first judged by their size and mtime, restore/trust.py, and only
those it cannot judge are read.)

Why each rule:
- a directory whose postmaster.pid names a live server is refused before anything changes: the
  server would go on writing into the files being replaced;
- a non-empty directory must be a data directory (PG_VERSION), a non-empty tablespace directory
  hold only PostgreSQL's ``PG_<major>_<catalog>`` directories: a mistyped path is refused, not
  emptied;
- ``global/pg_control`` is removed first and written last, after the restore's settings: a delta
  restore that stops halfway (an error, a kill) leaves a directory PostgreSQL refuses to start,
  never a mix of old and new files that would start (or a standby without its standby.signal);
- a file is only changed in place when it is a plain file with a single link, opened without
  following links; anything else is removed and written anew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import mmap
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from drkit.errors import ClusterRunning, RestoreTargetError
from drkit.fsutil import os_reason, pread_into
from drkit.pg.layout import restored_mode
from drkit.pools import worker_pool
from drkit.repo.chain import FilePlan
from drkit.restore.paths import TargetTree
from drkit.restore.trust import MTIME_TOLERANCE_S, Trust

PG_CONTROL = "global/pg_control"
# Directories a restore makes whether or not the backup lists them
_MADE = frozenset({"pg_tblspc", "pg_wal", "pg_wal/archive_status", "pg_wal/summaries"})
_VERSION_DIR = re.compile(r"PG_[0-9]+_[0-9]+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_BUFFER = 1024 * 1024
BATCH_BYTES = 1024 * 1024  # small files compared by one task of the pool, together
BATCH_TASKS = 256
DIRECT_ALIGN = 4096


@dataclass
class DeltaSummary:
    """What a delta restore changed. A directory removed counts once, with its contents."""

    rewritten: int = 0  # files written whole (global/pg_control always is)
    patched: int = 0  # large files kept in place, only their differing chunks written
    unchanged: int = 0  # files that already matched their checksum
    removed: int = 0  # entries the backup does not have
    written: int = 0  # bytes written
    # With --trust-timestamps: files kept on their size and mtime, not read (restore/trust.py),
    # and the backup the copy was restored from, when it names one the repository holds
    trusted: int = 0
    origin: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DeltaWork:
    """What is left to write once the existing files were compared."""

    plans: list[FilePlan]  # written whole, or (listed in ``chunks``) in part
    chunks: dict[str, set[int]]  # files kept in place: the chunks written into them
    last: FilePlan | None  # global/pg_control, written after the settings
    summary: DeltaSummary


def check_delta_target(pgdata: Path, tablespaces: dict[int, Path]) -> None:
    """Refuse a running cluster's directory (ClusterRunning), a non-empty ``pgdata`` that is no
    data directory, and a non-empty tablespace directory holding more than PostgreSQL puts there.
    Changes nothing."""
    names = _entries(pgdata)
    if names:
        _check_not_running(pgdata)
        if "PG_VERSION" not in names:
            raise RestoreTargetError(
                f"unable to restore to path '{pgdata}' with --delta because it contains files"
                " but no PG_VERSION: it is not a PostgreSQL data directory",
                hint="give the data directory itself, or restore into an empty or new directory"
                " without --delta",
            )
    for directory in tablespaces.values():
        foreign = sorted(n for n in _entries(directory) if not _VERSION_DIR.fullmatch(n))
        if foreign:
            raise RestoreTargetError(
                f"unable to restore a tablespace to path '{directory}' with --delta because it"
                f" holds '{foreign[0]}', which is not a PostgreSQL tablespace version directory",
                hint="map the tablespace to its own directory (--tablespace-map OID=DIR)",
            )


def _entries(directory: Path) -> list[str]:
    """The names in ``directory`` ([] when it does not exist)."""
    try:
        if not directory.exists():
            return []
        if not directory.is_dir() or directory.is_symlink():
            raise RestoreTargetError(
                f"unable to restore to '{directory}' because it is not a directory"
            )
        return os.listdir(directory)
    except OSError as exc:
        raise RestoreTargetError(
            f"unable to restore to path '{directory}': {os_reason(exc)}",
            hint="restore as a user who can enter every directory above it (the user the"
            " restored server will run as)",
        ) from None


def _check_not_running(pgdata: Path) -> None:
    """ClusterRunning when postmaster.pid names a live process whose working directory is
    ``pgdata`` (or cannot be read): a server runs there. A postmaster.pid left by a crash, whose
    process is gone (or its number reused elsewhere), is only a file the restore removes."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(pgdata / "postmaster.pid", flags)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ClusterRunning(
            f"unable to tell whether a server runs in '{pgdata}': postmaster.pid: {os_reason(exc)}",
            hint="if no server runs from this directory, remove its postmaster.pid and run the"
            " restore again; nothing was changed",
        ) from None
    with open(fd, "rb") as lock:
        first = lock.read(64).split(b"\n", 1)[0].strip()
    pid = abs(int(first)) if first.lstrip(b"-").isdigit() else 0  # negative: single-user mode
    if pid and not _serves(pid, pgdata):
        return
    what = f"process {pid}" if pid else "no process number"
    raise ClusterRunning(
        f"unable to restore to path '{pgdata}' because a PostgreSQL server is running in it"
        f" (postmaster.pid: {what})",
        hint=f"stop it first (pg_ctl -D '{pgdata}' stop); if no server runs from this directory,"
        " remove its postmaster.pid; nothing was changed",
    )


def _serves(pid: int, pgdata: Path) -> bool:
    """Whether process ``pid`` lives and may be the server of ``pgdata`` (PostgreSQL works in
    its data directory; a process whose directory cannot be read is assumed to be it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        there, here = os.stat(f"/proc/{pid}/cwd"), os.stat(pgdata)
    except OSError:
        return True
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


class DeltaRestore:
    """The existing directories of a restore, cleared of what the backup does not have and
    compared with what it has."""

    def __init__(
        self,
        pgdata: Path,
        tablespaces: dict[int, Path],
        plans: list[FilePlan],
        directories: list[str],
    ) -> None:
        self._roots = [("", pgdata)]
        self._roots += [(f"pg_tblspc/{oid}", d) for oid, d in tablespaces.items()]
        self._links = {str(oid) for oid in tablespaces}
        self._plans = {plan.entry.path: plan for plan in plans}
        self._directories = set(directories) | _MADE
        self._found: list[tuple[FilePlan, os.stat_result]] = []
        self.summary = DeltaSummary()

    def clear(self) -> None:
        """Remove global/pg_control, then every entry the backup does not have (and the
        pg_tblspc links, which the restore makes anew); note the files it has."""
        for prefix, directory in self._roots:
            try:
                fd = os.open(directory, _DIR_FLAGS)
            except FileNotFoundError:
                continue
            try:
                if not prefix:
                    remove_control(fd)
                self._clear(fd, prefix)
            finally:
                os.close(fd)

    def _clear(self, fd: int, prefix: str) -> None:
        with os.scandir(fd) as listing:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in listing]
        for name, st in entries:
            path = f"{prefix}/{name}" if prefix else name
            if stat.S_ISDIR(st.st_mode) and path in self._directories:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    if path == "pg_tblspc":
                        self._clear_links(sub)
                    else:
                        self._clear(sub, path)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode) and path in self._plans and path != PG_CONTROL:
                self._found.append((self._plans[path], st))
            else:
                _remove(fd, name, st)
                self.summary.removed += 1

    def _clear_links(self, fd: int) -> None:
        """Empty pg_tblspc: the links of the backup's tablespaces are made again, to the
        directories confirmed for this restore; anything else is not the backup's."""
        with os.scandir(fd) as listing:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in listing]
        for name, st in entries:
            _remove(fd, name, st)
            if not (stat.S_ISLNK(st.st_mode) and name in self._links):
                self.summary.removed += 1

    def compare(
        self, tree: TargetTree, workers: int, direct: bool, trust: Trust | None = None
    ) -> DeltaWork:
        """Check every file found against its entry (in parallel, a large file chunk by chunk),
        remove those to be written whole, give those kept their mode and mtime; what is left to
        write. ``tree`` holds the backup's directories, made over the cleared ones; ``direct``:
        read large files with O_DIRECT; ``trust``: first judge each file by its size and mtime,
        reading only those it cannot judge."""
        checks = [_Check(plan, st, trust) for plan, st in self._found]
        tasks: list[tuple[int, Callable[[], None]]] = []
        for check in checks:
            tasks += check.tasks(tree, direct)
        # Each thread reads a range, then hashes it: twice as many threads as workers keep the
        # disk reading while the others hash (O_DIRECT reads have no read-ahead to do it)
        with worker_pool(2 * workers, "compare") as pool:
            list(pool.map(_run_all, _batches(tasks)))

        summary = self.summary
        summary.origin = trust.origin if trust is not None else None
        plans: list[FilePlan] = []
        chunks: dict[str, set[int]] = {}
        for check in checks:
            path = check.plan.entry.path
            if check.unchanged:
                if not check.settled:  # setting them again would only dirty its inode
                    tree.finish_file(path, check.plan.entry.mode, check.plan.entry.mtime)
                if check.trusted:
                    summary.trusted += 1
                else:
                    summary.unchanged += 1
                continue
            plans.append(check.plan)
            if check.rewrite_chunks is None:
                tree.unlink(path)
                summary.rewritten += 1
                summary.written += check.plan.entry.size
            else:
                chunks[path] = check.rewrite_chunks
                summary.patched += 1
                summary.written += check.rewrite_bytes
        found = {check.plan.entry.path for check in checks}
        for path, plan in self._plans.items():
            if path not in found and path != PG_CONTROL:  # missing: written whole
                plans.append(plan)
                summary.rewritten += 1
                summary.written += plan.entry.size
        last = self._plans.get(PG_CONTROL)
        if last is not None:
            summary.rewritten += 1
            summary.written += last.entry.size
        return DeltaWork(plans, chunks, last, summary)


class _Check:
    """The comparison of one existing file with its entry: whole, or chunk by chunk for a large
    file stored in chunks (whose chunks are each checked, and restored, on their own)."""

    def __init__(self, plan: FilePlan, st: os.stat_result, trust: Trust | None) -> None:
        self.plan = plan
        self._size = st.st_size
        # Whether the file already has the mode and mtime a restore gives it
        self.settled = (
            stat.S_IMODE(st.st_mode) == restored_mode(plan.entry.mode, False)
            and abs(st.st_mtime - plan.entry.mtime) < MTIME_TOLERANCE_S
        )
        entry = plan.entry
        self._chunks = _chunk_bounds(plan)
        self._differs: set[int] = set()  # chunks that differ
        # Written whole without reading: a file that is not plain (hard links), or whose entry
        # has no checksum to prove it by (a delta read from WAL summaries)
        self._whole = st.st_nlink != 1 or entry.sha256 is None
        self._matches = False  # a file compared whole matched
        # Judged by its size and mtime, not read
        self.judged = None if trust is None else trust.judge(plan, st, self._chunks)
        if self.judged is not None:
            self._whole = self.judged.write is None
            self._matches = not self.judged.write
            self._differs = set(self.judged.write or ())

    @property
    def trusted(self) -> bool:
        return self.judged is not None

    def tasks(self, tree: TargetTree, direct: bool) -> list[tuple[int, Callable[[], None]]]:
        """The comparisons to run, each with the bytes it reads."""
        entry = self.plan.entry
        if self._whole or self.judged is not None:
            return []
        if self._chunks is None:
            if self._size != entry.size:
                self._whole = True
                return []
            return [(self._size, partial(self._compare_whole, tree, direct))]
        tasks: list[tuple[int, Callable[[], None]]] = []
        for index, (start, end, sha256) in enumerate(self._chunks):
            if end > self._size:
                self._differs.add(index)  # not all there: written without reading
            else:
                compare = partial(self._compare_chunk, tree, direct, index, start, end, sha256)
                tasks.append((end - start, compare))
        return tasks

    def _compare_whole(self, tree: TargetTree, direct: bool) -> None:
        found = _digest(tree, self.plan.entry.path, 0, self._size, direct)
        self._matches = found == self.plan.entry.sha256

    def _compare_chunk(
        self, tree: TargetTree, direct: bool, index: int, start: int, end: int, sha256: str
    ) -> None:
        if _digest(tree, self.plan.entry.path, start, end, direct) != sha256:
            self._differs.add(index)  # set.add is atomic: chunks of one file run in parallel

    @property
    def unchanged(self) -> bool:
        if self._whole:
            return False
        if self._chunks is None or self.judged is not None:
            return self._matches
        return not self._differs and self._size == self.plan.entry.size

    @property
    def rewrite_chunks(self) -> set[int] | None:
        """The chunks to write into the file kept in place; None: the file is written whole."""
        if self._whole or self._chunks is None or len(self._differs) == len(self._chunks):
            return None
        return set(self._differs)

    @property
    def rewrite_bytes(self) -> int:
        assert self._chunks is not None
        return sum(self._chunks[i][1] - self._chunks[i][0] for i in self._differs)


def _batches(tasks: list[tuple[int, Callable[[], None]]]) -> list[list[Callable[[], None]]]:
    """``tasks`` in order, consecutive small ones together (up to BATCH_BYTES read, BATCH_TASKS
    tasks): a task of a thread pool costs some 10 us of CPU, as much as comparing a small file,
    and a data directory can hold 100,000 of them."""
    batches: list[list[Callable[[], None]]] = []
    batch: list[Callable[[], None]] = []
    size = 0
    for nbytes, task in tasks:
        if batch and (size + nbytes > BATCH_BYTES or len(batch) == BATCH_TASKS):
            batches.append(batch)
            batch, size = [], 0
        batch.append(task)
        size += nbytes
    if batch:
        batches.append(batch)
    return batches


def _run_all(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _chunk_bounds(plan: FilePlan) -> list[tuple[int, int, str]] | None:
    """(start, end, sha256) in the file of each chunk of a file restored from one whole frame
    stored in chunks; None for any other file, or when the chunks do not tile the file."""
    entry = plan.layers[0].entry
    if not plan.simple or not entry.chunks:
        return None
    starts = [chunk[0] for chunk in entry.chunks]
    ends = [*starts[1:], entry.size]
    if starts[0] != 0 or any(a >= b for a, b in zip(starts, ends, strict=True)):
        return None
    return [(a, b, c[2]) for a, b, c in zip(starts, ends, entry.chunks, strict=True)]


def _digest(tree: TargetTree, path: str, start: int, end: int, direct: bool) -> str:
    """sha256 of bytes [start, end) of ``path`` ('' when the file is shorter). With ``direct``,
    a range of READ_BUFFER or more is read with O_DIRECT: a stale copy is mostly not cached, and
    reading it through the page cache cost more CPU than hashing it."""
    direct = direct and end - start >= READ_BUFFER and start % DIRECT_ALIGN == 0
    try:
        fd = tree.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        fd, direct = tree.open(path, os.O_RDONLY), False  # a file system without O_DIRECT
    try:
        if not direct:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
        digest = hashlib.sha256()
        buffer = _buffer() if direct else memoryview(bytearray(min(READ_BUFFER, end - start)))
        stream, position = io.FileIO(fd, "rb", closefd=False), start
        while position < end:
            want = min(len(buffer), -(-(end - position) // DIRECT_ALIGN) * DIRECT_ALIGN)
            n = min(pread_into(stream, buffer[:want], position), end - position)
            if n <= 0:
                return ""
            digest.update(buffer[:n])
            position += n
        return digest.hexdigest()
    finally:
        os.close(fd)


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's page-aligned read buffer (O_DIRECT reads need one)."""
    if not hasattr(_local, "buffer"):
        _local.buffer = memoryview(mmap.mmap(-1, READ_BUFFER))
    buffer: memoryview = _local.buffer
    return buffer


def _remove(fd: int, name: str, st: os.stat_result) -> None:
    """Remove entry ``name`` of directory ``fd``: a link itself, never what it points to."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=fd)  # by descriptors: links inside are removed, not followed
    else:
        os.unlink(name, dir_fd=fd)


def remove_control(pgdata_fd: int) -> None:
    """Remove global/pg_control (if it is there) from the data directory open as ``pgdata_fd``:
    PostgreSQL will not start from the directory until the restore writes it again."""
    try:
        global_fd = os.open("global", _DIR_FLAGS, dir_fd=pgdata_fd)
    except OSError:
        return  # no global directory (or something else by that name, which the walk removes)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("pg_control", dir_fd=global_fd)
    finally:
        os.close(global_fd)
