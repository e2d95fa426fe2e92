"""The drill's sandbox: a fresh private directory the restored copy lives and dies in.

Everything a drill writes goes under one directory, ``<[drill] sandbox>/drill-<id>`` (mode 0700,
owned by the user the restored server runs as): the data directory, every tablespace (mapped
into the sandbox, never to the locations the backup records, which are production's), the unix
socket (unless its path would be too long for one: drkit.pg.cluster then puts it in a short
private directory it removes with the server), the server log and the access rules. Removing
that directory undoes the drill.

While the drill runs it holds a ``flock`` on ``.drill.lock`` in its sandbox (the kernel lets go
when the process dies, however it dies). A sandbox has its ``drill-<id>`` name only while it is
whole and locked: it is made as ``.drill-<id>.new`` and renamed once its lock is held, and it is
renamed to ``.drill-<id>.gone`` before it is removed. A drill killed outright (kill -9, a power
cut of the drill host) cannot tear down: the next drill finds what it left (a sandbox with its
lock free, a half-made or half-removed one), stops every process still running there (the
server, a ``pg_ctl`` still starting it, the WAL fetcher: SIGQUIT, the immediate shutdown; then
SIGKILL) and removes it. A sandbox kept with ``--keep`` has no lock file and is never touched; a
half-made one without its lock yet is left to its maker for a minute.

With ``[drill] reuse_sandbox`` a drill takes the one reusable sandbox, ``<[drill]
sandbox>/reusable``, instead, and leaves it behind (server stopped) for the next: the restore
brings its data directory to the new backup by delta, writing only what differs, every file kept
proven by its checksum. It is locked the same way while a drill runs in it; a drill that finds it
locked takes a fresh sandbox. Everything in it but the data directory and the tablespaces the
backup has (the log, the access rules, the socket directory, a server left by a killed drill) is
removed first.

The sandbox is refused inside the source's data directory or any of its tablespaces (a drill
must never write where production lives) and on a file system without room for the restored
size plus the WAL to replay. The throwaway server gets settings that keep it from reaching
anything: no TCP (``listen_addresses = ''``), a socket only in the sandbox, trust only on that
socket, no archiving, no replication connection, no logical replication workers, no synchronous
standby to wait for. They are ``-c`` options, which outrank the restored configuration files.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from drkit.errors import DrillRestoreFailed
from drkit.interrupts import Interrupted

# Head room on top of the estimate: PostgreSQL's own files at start-up, the log, a checkpoint.
_SPARE_BYTES = 256 * 1024 * 1024
_RESTORED_SEGMENT = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
_HBA = "# drkit drill sandbox: only this socket, no TCP\nlocal all all trust\n"
LOCK_NAME = ".drill.lock"
_MAKING, _REMOVING = ".new", ".gone"  # suffixes of ".drill-<id>" while it is made or removed
_MAKER_GRACE = 60  # seconds a half-made sandbox without its lock yet is left to its maker
REUSABLE = "reusable"  # not a "drill-*" name: never taken for a killed drill's sandbox

log = logging.getLogger(__name__)


class DrillInterrupted(Interrupted):
    """SIGTERM or SIGINT during a drill: every ``finally`` (stop the server, remove the sandbox)
    runs, and thread pools let their running tasks end first, so nothing writes into the
    sandbox while it is removed."""

    wait_for_workers = True


@dataclass(frozen=True)
class Sandbox:
    """One drill's directory and the paths in it; ``lock_fd`` holds its lock while it runs."""

    root: Path
    uid: int
    gid: int
    lock_fd: int = -1
    reused: bool = False  # the reusable sandbox: restored into by delta, kept for the next drill

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def hba_file(self) -> Path:
        return self.root / "pg_hba.conf"

    def tablespace(self, oid: int) -> Path:
        return self.root / "tablespaces" / str(oid)

    def server_settings(self) -> dict[str, object]:
        """The throwaway server's ``-c`` settings (port and socket directory come separately)."""
        return {
            "listen_addresses": "",
            "hba_file": str(self.hba_file),
            "archive_mode": "off",
            "primary_conninfo": "",
            "primary_slot_name": "",
            "synchronous_standby_names": "",
            "max_logical_replication_workers": 0,
            "hot_standby": "on",
        }

    def prepare_server_files(self) -> None:
        """The access rules, and an empty postgresql.conf when the backup has none (Debian keeps
        it in /etc): the settings that matter are passed on the command line."""
        _write_owned(self.hba_file, _HBA, self.uid, self.gid)
        conf = self.pgdata / "postgresql.conf"
        if self.pgdata.is_dir() and not conf.exists():
            _write_owned(
                conf,
                "# drkit drill: the source kept its configuration elsewhere\n",
                self.uid,
                self.gid,
            )

    def segments_restored(self) -> int:
        """How many WAL segments the server fetched from the archive, from its log."""
        return len(set(_RESTORED_SEGMENT.findall(self._log())))

    def server_said(self) -> str:
        """The server's last FATAL or PANIC message (why it stopped), or ''."""
        for line in reversed(self._log().splitlines()):
            for level in ("PANIC:", "FATAL:"):
                if level in line:
                    return line[line.index(level) :].strip()
        return ""

    def _log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        """Delete the sandbox and everything in it (links are removed, never followed). It loses
        its name first: a drill killed while removing leaves a ``.gone`` directory the next one
        recognises and finishes removing."""
        gone = self.root.with_name(f".{self.root.name}{_REMOVING}")
        os.rename(self.root, gone)
        _remove_tree(gone)
        self._unlock()

    def release(self) -> None:
        """Leave the reusable sandbox for the next drill (its server stopped)."""
        self._unlock()

    def clear_for_reuse(self, tablespaces: set[int]) -> None:
        """Stop a server a killed drill left here, and remove everything but the data directory
        (unless it is no data directory: a restore killed early) and the tablespace directories
        of ``tablespaces``."""
        _stop_processes(self.root)
        for child in self.root.iterdir():
            if child.name == LOCK_NAME or (child.name == "tablespaces" and _real_dir(child)):
                continue
            if child == self.pgdata and _real_dir(child) and _real_file(child / "PG_VERSION"):
                continue
            _remove_entry(child)
        keep = {str(oid) for oid in tablespaces}
        if (self.root / "tablespaces").exists():
            for child in (self.root / "tablespaces").iterdir():
                if child.name not in keep or not _real_dir(child):
                    _remove_entry(child)

    def usage(self) -> int:
        """Bytes the sandbox's files take on disk (links not followed)."""
        total = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
        return total

    def keep(self) -> None:
        """Leave the sandbox for the operator: no later drill may take it for a stale one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / LOCK_NAME)
        self._unlock()

    def _unlock(self) -> None:
        if self.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)


def create_sandbox(
    parent: Path, name: str, *, forbidden: list[Path], needed_bytes: int, server_user: str | None
) -> Sandbox:
    """Make ``parent/name`` (0700, owned by the server user) after checking that it is not
    inside any of ``forbidden`` (the source's data directory and tablespaces) and that the file
    system has room for ``needed_bytes``. Raises DrillRestoreFailed saying why not."""
    parent, uid, gid = _check_parent(parent, forbidden, server_user)
    _require_room(parent, needed_bytes)
    remove_stale_sandboxes(parent)
    root, making = parent / name, parent / f".{name}{_MAKING}"
    making.mkdir(mode=0o700)  # a fresh name: fails rather than reuse anything
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    lock_fd = os.open(making / LOCK_NAME, flags, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # not inherited by the server: os.open is O_CLOEXEC
    if os.geteuid() == 0:
        os.chown(making, uid, gid)
    if os.path.lexists(root):
        os.close(lock_fd)
        _remove_tree(making)
        raise DrillRestoreFailed(f"refusing the drill sandbox '{root}': it exists already")
    os.rename(making, root)
    return Sandbox(root, uid, gid, lock_fd)


def reuse_sandbox(
    parent: Path,
    *,
    forbidden: list[Path],
    needed_bytes: int,
    server_user: str | None,
    tablespaces: set[int],
) -> Sandbox | None:
    """The reusable sandbox ``parent/reusable`` (made when missing), checked as
    ``create_sandbox`` checks a new one, locked and cleared for a delta restore (keeping the
    tablespace directories of ``tablespaces``); None when another drill holds it."""
    parent, uid, gid = _check_parent(parent, forbidden, server_user)
    remove_stale_sandboxes(parent)
    root = parent / REUSABLE
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    if not _real_dir(root):
        raise DrillRestoreFailed(
            f"refusing the reusable drill sandbox '{root}': it is not a directory",
            hint="remove it (drkit makes it again), or set [drill] reuse_sandbox = false",
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    lock_fd = os.open(root / LOCK_NAME, flags, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return None  # a drill runs there
    if os.geteuid() == 0:
        os.chown(root, uid, gid)
    os.chmod(root, 0o700)
    sandbox = Sandbox(root, uid, gid, lock_fd, reused=True)
    try:
        sandbox.clear_for_reuse(tablespaces)
        _require_room(parent, needed_bytes - sandbox.usage())
    except BaseException:
        sandbox.release()
        raise
    return sandbox


def _check_parent(
    parent: Path, forbidden: list[Path], server_user: str | None
) -> tuple[Path, int, int]:
    """``parent`` made absolute and created, checked to be outside ``forbidden`` and passable
    by the server user; with that user's uid and gid."""
    parent = parent.absolute()
    resolved = _resolve_existing(parent)
    for place in forbidden:
        place_resolved = _resolve_existing(place.absolute())
        if resolved == place_resolved or place_resolved in resolved.parents:
            raise DrillRestoreFailed(
                f"refusing the drill sandbox '{parent}': it is inside '{place}', which belongs"
                " to the source cluster",
                hint="set [drill] sandbox to a directory outside PGDATA and its tablespaces",
            )
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise DrillRestoreFailed(
            f"cannot create the drill sandbox directory '{parent}': {exc.strerror}",
            hint="set [drill] sandbox to a directory drkit may create",
        ) from None
    uid, gid = _owner(parent, server_user)
    _require_traversable(parent, uid, gid)
    return parent, uid, gid


def _require_room(parent: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + _SPARE_BYTES:
        raise DrillRestoreFailed(
            f"not enough space for the drill sandbox in '{parent}': the restored copy needs"
            f" about {_mib(needed_bytes + _SPARE_BYTES)} MiB, {_mib(free)} MiB are free",
            hint="free space there or set [drill] sandbox to a larger file system",
        )


def remove_stale_sandboxes(parent: Path) -> list[Path]:
    """Stop the processes of, and remove, what drills that died without tearing down left: their
    sandboxes (lock free), half-made and half-removed ones; returns them. Kept sandboxes (no lock
    file), running drills' (lock held) and a half-made one its maker may still lock are left
    alone."""
    removed = []
    for entry in sorted(parent.iterdir()):
        name = _drill_name(entry.name)
        if name is None or not _real_dir(entry):
            continue
        lock = _lock_state(entry)
        if lock == "held":
            continue  # a drill runs there
        if lock == "missing":
            if entry.name == name:
                continue  # kept with --keep
            if entry.name.endswith(_MAKING) and _age(entry) < _MAKER_GRACE:
                continue
        # The processes name the sandbox by the path it had when they started
        _stop_processes(parent / name, entry)
        _remove_tree(entry)
        log.warning(f"removed the sandbox '{parent / name}' of a drill that was killed")
        removed.append(entry)
    return removed


def _drill_name(entry: str) -> str | None:
    """The sandbox name ``drill-<id>`` of a directory entry: the sandbox itself, or it while it is
    made or removed; None for anything else."""
    if entry.startswith("drill-"):
        return entry
    for suffix in (_MAKING, _REMOVING):
        if entry.startswith(".drill-") and entry.endswith(suffix):
            return entry[1 : -len(suffix)]
    return None


def _lock_state(directory: Path) -> str:
    """ "held" by a running drill, "free", or "missing"."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return "missing"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)
    return "free"


def _age(path: Path) -> float:
    return time.time() - path.lstat().st_mtime


def _stop_processes(*places: Path) -> None:
    """Stop every process whose command line names a path in ``places``: a server left running
    there (its postmaster keeps the ``-D`` it was started with), a ``pg_ctl`` still starting one
    (no postmaster.pid yet), the WAL fetcher of its recovery. SIGQUIT first (a server's immediate
    shutdown, which also ends its children), SIGKILL to what is left after 10 seconds."""
    pids = _processes_naming(places)
    for signum in (signal.SIGQUIT, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _processes_naming(places: tuple[Path, ...]) -> list[int]:
    names = [str(place).encode() for place in places]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(_names(arg, name) for arg in argv for name in names):
            found.append(int(entry))
    return found


def _names(arg: bytes, place: bytes) -> bool:
    """``arg`` is ``place`` or a path under it, alone or at the end of an option (``-D/x``)."""
    at = arg.find(place)
    end = at + len(place)
    return at >= 0 and (end == len(arg) or arg[end : end + 1] in (b"/", b'"', b"'", b" "))


def _alive(pid: int) -> bool:
    """The process exists and is no zombie (an orphan's parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :][:1] != "Z"


def _owner(parent: Path, server_user: str | None) -> tuple[int, int]:
    """Who the restored server runs as: the caller, or when that is root, the source's owner
    (``server_user``), else the owner of the sandbox's parent, else 'postgres'."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    for name in (server_user, _name(parent.stat().st_uid), "postgres"):
        if name and name != "root":
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return entry.pw_uid, entry.pw_gid
    raise DrillRestoreFailed(
        "no user to run the drill's PostgreSQL as: PostgreSQL does not run as root",
        hint="give [drill] sandbox's directory to the user PostgreSQL runs as",
    )


def _require_traversable(parent: Path, uid: int, gid: int) -> None:
    """The server user must reach its data directory: every directory above the sandbox must
    let it pass (PostgreSQL would otherwise fail at start with a less helpful message)."""
    for directory in [parent, *parent.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise DrillRestoreFailed(
                f"the drill's server user ({_name(uid) or uid}) cannot reach the sandbox in"
                f" '{parent}': '{directory}' does not let it pass (mode"
                f" {st.st_mode & 0o777:o}, owner {_name(st.st_uid) or st.st_uid})",
                hint=f"let that user traverse '{directory}' (chmod o+x or chown), or set"
                " [drill] sandbox elsewhere",
            )


def _name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _resolve_existing(path: Path) -> Path:
    """``path`` with every link of its existing part resolved (the rest appended as given)."""
    existing, rest = path, []
    while not existing.exists() and existing != existing.parent:
        rest.append(existing.name)
        existing = existing.parent
    return existing.resolve().joinpath(*reversed(rest))


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _real_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _remove_entry(path: Path) -> None:
    """Remove ``path``: a link itself, a directory with its contents (links inside removed,
    never followed)."""
    if _real_dir(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_tree(path: Path) -> None:
    """Remove a directory tree (links inside removed, never followed); a second try says why it
    fails. A concurrent remover (another drill cleaning up) is no failure."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)


def _write_owned(path: Path, text: str, uid: int, gid: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    with open(fd, "w", encoding="utf-8") as out:
        out.write(text)
        if os.geteuid() == 0:
            os.fchown(out.fileno(), uid, gid)


def _mib(size: int) -> int:
    return size // (1024 * 1024)
