"""The quick path of ``wal-fetch --prefetch``: rename a segment the background fetcher has ready
into place without starting drkit at all.

Recovery waits for every restore_command call, so whatever a call costs is lost to replay, once
per segment. A full ``drkit wal-fetch`` spends about 0.1 s starting Python with its
site-packages, drkit's configuration loader and logging before it renames a ready segment, which
itself takes well under a millisecond. So the restore_command ``drkit restore`` writes is

    <python> -I -S <this file> [--spool-root DIR] -- <drkit> wal-fetch --prefetch ... %f %p

``-S`` skips site-packages and ``-I`` the environment and the script's own directory: this file
imports the standard library only, and starts in a few milliseconds. It serves the request
exactly as ``wal-fetch --prefetch`` would when the fetcher has the file (drkit/wal/prefetch.py
tells the protocol, and takes its segments through the functions here). A segment or history
file the fetcher has not spooled is asked of the fetcher, which fetches it at once through the
same function as a direct fetch: recovery asks for the last segment again when it ends, and for
the segment after the archive's end and for history files that are not archived. The answer is
the file, or "not archived" from a look at the repositories made after this request was made
(exit 1, as the full command would), or "fetch it yourself". In every other case this replaces
itself (``exec``) with the full command after ``--``: no fetcher running or answering, a spool
it cannot vouch for, a file that came with a notice, a file the fetcher could not fetch (damaged,
unreadable: the full command fails as it must), ``DRKIT_*`` variables that could change the
configuration, anything unexpected. The full command then does what it always does, and says
why.

The spool is ``<root>/fetch-<hash of the data directory>``: ``--spool-root`` is the
configuration's ``[archive] spool_path`` or ``lock_path`` when it sets one, and otherwise the
default lock path of the user the server runs as, as drkit.private_dir computes it. A spool
that is not where the full command looks has no fetcher holding its lock, so a wrong guess only
costs the quick path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time

TYPE_CHECKING = False  # typing itself costs more to import than this whole file
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

LOCK_FILE = "fetcher.lock"
WANT_FILE = "want"  # "<name>": the file asked for; "<name> <token>": and fetch it, please
# (a token is "<pid>.<CLOCK_MONOTONIC ns when it was asked>")
ANSWER_FILE = "answer"  # "<token> <verdict>": the fetcher's answer to the request with <token>
# (a fetcher that answers requests writes it as it starts)
FETCHING, MISSING, DIRECT = "fetching", "missing", "direct"  # the verdicts
PART = ".part"  # a segment being written, renamed to its name once complete
INFO = ".info"  # beside a spooled segment: the repository that served it, then its notices
SIGNAL_FILES = ("recovery.signal", "standby.signal")
WAIT_LIMIT = 60.0  # seconds a request waits for a segment the fetcher is writing
ANSWER_LIMIT = 10.0  # seconds a request waits for the fetcher to take it up
_HEX = frozenset("0123456789ABCDEF")
HISTORY = ".history"


def spool_name(pgdata: str) -> str:
    """The spool's directory name for the cluster in ``pgdata`` (an absolute, resolved path)."""
    return "fetch-" + _sha256(pgdata.encode()).hexdigest()[:12]


def _sha256(data: bytes) -> Any:
    """SHA-256 from the interpreter's built-in module when it has one: hashlib loads OpenSSL,
    which costs more than the rest of this script's start."""
    try:
        from _sha2 import sha256  # Python 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # Python 3.11
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def recovering(pgdata: str) -> bool:
    """A server runs in ``pgdata`` and has not finished its recovery."""
    return os.path.exists(os.path.join(pgdata, "postmaster.pid")) and any(
        os.path.exists(os.path.join(pgdata, name)) for name in SIGNAL_FILES
    )


def ready(dir_fd: int, name: str) -> bool:
    """A complete segment this user wrote (never anything else, never through a link)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def in_flight(dir_fd: int, name: str) -> bool:
    """The fetcher is writing ``name`` (its ``.part`` file, or the temporary beside it)."""
    return any(n == name + PART or n.startswith(f".{name}{PART}.") for n in os.listdir(dir_fd))


def fetchable(name: str) -> bool:
    """A segment's or a timeline history file's name: what the fetcher answers requests for."""
    stem = name.removesuffix(HISTORY)
    return len(stem) == (8 if stem != name else 24) and _HEX.issuperset(stem)


def request_line(want: str) -> tuple[str, str]:
    """(name, token) of the ``want`` file's text; the token is empty for the full command's."""
    name, _, token = want.strip().partition(" ")
    return name, token


def wait_ready(dir_fd: int, name: str, fetcher_gone: Callable[[], bool]) -> bool:
    """Wait while the fetcher writes ``name``; True once it is ready. False when it is not
    coming: not spooled nor being written, the fetcher gone, or ``WAIT_LIMIT`` passed."""
    deadline = checked = time.monotonic()
    deadline += WAIT_LIMIT
    while not ready(dir_fd, name) and in_flight(dir_fd, name):
        now = time.monotonic()
        if now > deadline:
            return False
        if now - checked > 0.1:  # a fetcher that died writing it never finishes it
            if fetcher_gone():
                return False
            checked = now
        time.sleep(0.002)
    return ready(dir_fd, name)


def publish(dir_fd: int, name: str, text: str) -> None:
    """Write ``name`` in the spool whole (a temporary file renamed over it)."""
    temporary = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def read_info(dir_fd: int, name: str) -> list[str]:
    """The lines of ``name``'s ``.info``: the repository that served it, then its notices."""
    try:
        fd = os.open(name + INFO, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return [""]
    with os.fdopen(fd) as file:
        return (file.read() or "\n").splitlines()


# -- the quick path itself -------------------------------------------------------------------------


def _default_root() -> str:
    """drkit.private_dir.default_lock_path, for the user this runs as."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/drkit"
    import pwd

    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = ""
    return os.path.join(home or "/nonexistent", ".drkit")


def _open_spool(root: str, pgdata: str) -> int | None:
    """The spool's descriptor when it is a directory of this user that group and others
    cannot write (what drkit.private_dir demands); None otherwise."""
    path = os.path.join(root, spool_name(pgdata))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def _fetcher_gone(dir_fd: int) -> bool:
    """No fetcher holds the spool's lock (or the lock file is not a plain file of ours)."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return True
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # got it: none runs (the full command clears what a dead one left)
    finally:
        os.close(fd)


def _answer(dir_fd: int, token: str) -> str | None:
    """The fetcher's verdict on the request with ``token``: "" when it has not given one yet,
    None when this fetcher answers no requests (it writes its answer file as it starts)."""
    try:
        fd = os.open(ANSWER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        answered, _, verdict = os.read(fd, 256).decode().strip().partition(" ")
    finally:
        os.close(fd)
    return verdict if answered == token else ""


def _wait(dir_fd: int, name: str) -> str | None:
    """Wait for ``name`` in the spool: "ready", MISSING (the fetcher found it not archived), or
    None (the full command answers). While the fetcher writes it, as long as it writes; when it
    neither has it nor writes it, the request is handed to a fetcher that answers requests
    (its answer file is there), for as long as it takes it up within ``ANSWER_LIMIT`` and has
    not answered DIRECT. Always None once the fetcher is gone."""
    start = checked = time.monotonic()
    token, taken_up = "", False
    while True:
        if ready(dir_fd, name):
            return "ready"
        now = time.monotonic()
        if token:
            verdict = _answer(dir_fd, token)
            if verdict in (MISSING, DIRECT, None):
                return MISSING if verdict == MISSING else None
            taken_up = taken_up or verdict == FETCHING
            if now - start > (WAIT_LIMIT if taken_up else ANSWER_LIMIT):
                return None
        elif not in_flight(dir_fd, name) and not ready(dir_fd, name):  # not renamed meanwhile
            if _answer(dir_fd, "") is None:
                return None  # a fetcher that answers no requests: the full command
            token, start = f"{os.getpid()}.{time.monotonic_ns()}", now
            publish(dir_fd, WANT_FILE, f"{name} {token}\n")
            continue  # it may have become ready meanwhile: the token says when it was asked
        elif now - start > WAIT_LIMIT:
            return None
        if now - checked > 0.1:  # a fetcher that died fetching it never answers
            if _fetcher_gone(dir_fd):
                return None
            checked = now
        time.sleep(0.002)


def serve(root: str, name: str, dest: str) -> int | None:
    """Rename ``name`` from the spool to ``dest`` when the fetcher has it ready (or fetches it
    now) without a notice: 0; 1 when the fetcher found it not archived; None when the full
    command must answer this request."""
    if not fetchable(name):
        return None  # backup labels, partial segments: the full command
    pgdata = os.getcwd()  # restore_command runs in the data directory
    if not recovering(pgdata):
        return None
    fd = _open_spool(root, pgdata)
    if fd is None:
        return None
    try:
        publish(fd, WANT_FILE, name + "\n")  # how the fetcher learns where recovery is
        if _fetcher_gone(fd):
            return None
        found = _wait(fd, name)
        if found != "ready":
            return 1 if found == MISSING else None
        info = read_info(fd, name)
        if len(info) != 1:
            return None  # a notice to print: the full command prints it
        try:
            os.rename(name, dest, src_dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EXDEV):
                return None  # taken away meanwhile, or to be copied: the full command
            raise
        try:  # noqa: SIM105 - contextlib costs more to import than this whole file
            os.unlink(name + INFO, dir_fd=fd)
        except FileNotFoundError:
            pass
        return 0
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """``[--spool-root DIR] -- FULL COMMAND ... %f %p``: serve from the spool, or exec FULL."""
    root = None
    if argv[:1] == ["--spool-root"] and len(argv) > 1:
        root, argv = argv[1], argv[2:]
    if argv[:1] != ["--"] or len(argv) < 4:
        sys.stderr.write("drkit wal-fetch: error: usage: quick.py [--spool-root DIR] -- COMMAND\n")
        return 202
    full = argv[1:]
    overridden = any(k.startswith("DRKIT_") and k != "DRKIT_CONFIG" for k in os.environ)
    try:
        answer = None if overridden else serve(root or _default_root(), full[-2], full[-1])
        if answer is not None:
            return answer
    except Exception:  # noqa: S110 - whatever went wrong, the full command answers instead
        pass
    os.execv(full[0], full)  # noqa: S606 - drkit's own command, as the restore wrote it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
