"""A PostgreSQL server that drkit starts and stops itself, on a data directory it was given.

This is the sandbox a restored copy runs in: found binaries of the data directory's major version,
a port that was free, unix sockets in a directory the caller owns, extra settings on the command
line, the server log outside the data directory. It never looks for a server it did not start:
``stop()`` and ``is_running()`` only concern the postmaster this object launched, and ``start()``
refuses a data directory that already has a live postmaster, so pointing it at a production PGDATA
cannot stop production.

Settings are passed as ``-c name=value`` options, which PostgreSQL ranks above postgresql.conf and
postgresql.auto.conf: a restored copy of another cluster's configuration (archive_command, port,
listen_addresses) cannot override them. They are visible in the process list: never pass secrets.

PostgreSQL refuses to run as root; when drkit runs as root, the server runs as the owner of the
data directory (through ``runuser``, which keeps the environment this module builds).

A unix socket's path is at most 107 bytes (``sockaddr_un``); PostgreSQL cannot start when the
socket directory's path makes it longer. Such a server gets its sockets in a short private
directory instead: made by ``mkdtemp`` under /tmp (a random name nobody can create first, mode
0700), checked after creation (a directory of this user, not a link), then given to the server
user, and removed when the server stops. ``host`` names the directory in use.
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from drkit.errors import ServerControlError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "Cluster",
    "StopMode",
    "database_checksums",
    "free_port",
    "table_checksums",
]

StopMode = Literal["smart", "fast", "immediate"]

_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_POLL = 0.1  # seconds between checks while waiting for the server
SOCKET_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less its terminating NUL
_SHORT_SOCKET_PARENT = Path("/tmp")  # noqa: S108 - only for mkdtemp's random, checked names


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- the server ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Cluster:
    """One data directory and the server this object starts on it.

    ``socket_dir`` and the parent of ``log_file`` are the caller's: missing ones are created for
    the server user (the socket directory mode 0700). When the socket's path in ``socket_dir``
    would be too long, the server uses a short private directory instead (see the module's
    docstring); ``host`` is the one in use. ``port`` names the socket file and is a TCP
    port that was free when picked. ``listen_addresses`` is passed as a setting unless None
    (``""``: no TCP at all). ``env`` is added to the server's environment (and so to its
    restore_command), which otherwise is this process's minus every ``PG*`` variable and
    PYTHONPATH. ``dbuser`` is the role ``connect()`` logs in as.
    """

    pgdata: Path
    bindir: Path
    socket_dir: Path
    log_file: Path
    port: int = field(default_factory=free_port)
    settings: Mapping[str, object] = field(default_factory=dict)
    listen_addresses: str | None = ""
    env: Mapping[str, str] = field(default_factory=dict)
    dbuser: str = "postgres"
    _pid: int | None = field(default=None, init=False, repr=False)
    _short_socket_dir: Path | None = field(default=None, init=False, repr=False)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it accepts connections (a server in archive recovery
        does so once consistent, with hot_standby on). On failure nothing is left running and
        ``ServerControlError`` carries the tail of the server log."""
        self._refuse_live_postmaster()
        try:
            self._prepare_runtime_files()
        except BaseException:
            self._remove_short_socket_dir()
            raise
        command = [str(self.bindir / "pg_ctl"), "start", "-D", str(self.pgdata), "-w"]
        command += ["-t", str(math.ceil(timeout)), "-l", str(self.log_file)]
        command += ["-o", shlex.join(self._server_options())]
        # Output goes to a file, not a pipe: a pipe inherited by the daemonised postmaster would
        # keep subprocess waiting for EOF for as long as the server runs.
        with tempfile.TemporaryFile("w+") as out:
            try:
                code: int | None = subprocess.run(  # noqa: S603 - argv of absolute binaries, no shell
                    self._as_server_user(command),
                    cwd="/",
                    env=self._environment(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout + 30,
                ).returncode
            except subprocess.TimeoutExpired:
                code = None
            except BaseException:
                # Interrupted while pg_ctl waited (Ctrl-C, or SIGTERM turned into an exception):
                # the postmaster may be up already, started by this object, so stop it too.
                self._pid = self._live_postmaster()
                with contextlib.suppress(ServerControlError):
                    self.stop("immediate")
                raise
            out.seek(0)
            output = out.read().strip()
        self._pid = self._live_postmaster()
        if code != 0 or self._pid is None:
            with contextlib.suppress(ServerControlError):
                self.stop("immediate")
            said = [line for line in output.splitlines() if line.startswith("pg_ctl:")]
            reason = (said or output.splitlines() or ["pg_ctl gave no reason"])[-1]
            raise self._failure(f"PostgreSQL at '{self.pgdata}' did not start: {reason}")

    def wait_promoted(self, timeout: float = 60) -> None:
        """Wait until recovery has ended and the server runs as a primary
        (``pg_is_in_recovery()`` is false). Raises ``ServerControlError`` with the log tail when
        the server dies meanwhile or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise self._failure(f"PostgreSQL at '{self.pgdata}' stopped during recovery")
            state = self._recovery_state()
            if state == "promoted":
                return
            if time.monotonic() >= deadline:
                hint = None
                if state == "paused":
                    hint = (
                        "recovery paused at its target: set recovery_target_action = 'promote'"
                        " or call pg_wal_replay_resume()"
                    )
                raise self._failure(
                    f"PostgreSQL at '{self.pgdata}' still in recovery after {timeout:g}s", hint
                )
            time.sleep(_POLL)

    def stop(self, mode: StopMode = "fast", timeout: float = 60) -> None:
        """Stop the server this object started (no-op when none runs). A ``mode`` that does not
        finish within ``timeout`` seconds escalates to immediate, then to SIGKILL of the
        postmaster; raises ``ServerControlError`` only when even that leaves it alive."""
        pid = self._pid
        if pid is None or not self._is_postmaster(pid):
            self._pid = None
            self._remove_short_socket_dir()
            return
        for step in dict.fromkeys([mode, "immediate"]):
            command = [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", step]
            command += ["-w", "-t", str(math.ceil(timeout))]
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(  # noqa: S603 - pg_ctl by absolute path, no shell
                    self._as_server_user(command),
                    cwd="/",
                    env=self._environment(),
                    capture_output=True,
                    timeout=timeout + 30,
                )
            if not self._is_postmaster(pid):
                break
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not self._postmaster_gone(pid):
            if time.monotonic() >= deadline:
                raise self._failure(f"postmaster {pid} of '{self.pgdata}' did not exit")
            time.sleep(_POLL)
        self._pid = None
        self._remove_short_socket_dir()

    def is_running(self) -> bool:
        """Whether the postmaster this object started is alive."""
        return self._pid is not None and self._is_postmaster(self._pid)

    @contextlib.contextmanager
    def running(self, *, start_timeout: float = 60, stop_timeout: float = 60) -> Iterator[Cluster]:
        """``start()``, then ``stop()`` whatever happens inside (also on Ctrl-C)."""
        self.start(start_timeout)
        try:
            yield self
        finally:
            self.stop(timeout=stop_timeout)

    # -- clients ---------------------------------------------------------------------------

    @property
    def host(self) -> Path:
        """The directory the server's unix socket is in (libpq's ``host``): ``socket_dir``, or
        while the server runs the short private directory that replaces a too long one."""
        return self._short_socket_dir or self.socket_dir

    def conninfo(self, dbname: str = "postgres") -> str:
        """libpq conninfo for this server's unix socket."""
        parts = {
            "host": str(self.host),
            "port": str(self.port),
            "user": self.dbuser,
            "dbname": dbname,
        }
        return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in parts.items())

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit psycopg connection; the caller closes it (``with`` does)."""
        import psycopg  # here, not at the top: a restore imports this module for its helpers

        return psycopg.connect(self.conninfo(dbname), autocommit=True, connect_timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log, or ``(no log)``."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    @property
    def server_user(self) -> str:
        """The OS user the server runs as: the data directory's owner when drkit runs as root."""
        uid = self.pgdata.stat().st_uid if os.geteuid() == 0 else os.geteuid()
        return pwd.getpwuid(uid).pw_name

    # -- helpers ---------------------------------------------------------------------------

    def _server_options(self) -> list[str]:
        options = ["-p", str(self.port), "-k", str(self.host)]
        settings = dict(self.settings)
        if self.listen_addresses is not None:
            settings.setdefault("listen_addresses", self.listen_addresses)
        for name, value in settings.items():
            if not _SETTING_NAME.fullmatch(name):
                raise ServerControlError(f"invalid PostgreSQL setting name {name!r}")
            options += ["-c", f"{name}={_render_setting(value)}"]
        return options

    def _as_server_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        user = self.server_user
        if user == "root":
            raise ServerControlError(
                f"data directory '{self.pgdata}' is owned by root; PostgreSQL refuses to run as"
                " root",
                hint="give the data directory to the user that runs PostgreSQL (chown -R)",
            )
        return ["runuser", "-u", user, "--", *command]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.pop("PYTHONPATH", None)  # a restore_command running Python uses its own install
        env.update(self.env)
        return env

    def _prepare_runtime_files(self) -> None:
        """Socket directory and log file, usable by the server user. The log is opened without
        following a symlink: it is created (or appended to) as the caller asked, nowhere else."""
        owner = pwd.getpwnam(self.server_user) if os.geteuid() == 0 else None
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(str(socket_path))) > SOCKET_PATH_MAX:
            self._short_socket_dir = _make_short_socket_dir(owner)
        elif not self.socket_dir.is_dir():
            self.socket_dir.mkdir(mode=0o700, parents=True)
            if owner is not None:
                os.chown(self.socket_dir, owner.pw_uid, owner.pw_gid)
        self.log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        try:
            fd = os.open(self.log_file, flags, 0o600)
        except OSError as exc:
            raise ServerControlError(f"cannot open server log '{self.log_file}': {exc}") from None
        try:
            if owner is not None:
                os.fchown(fd, owner.pw_uid, owner.pw_gid)
        finally:
            os.close(fd)

    def _remove_short_socket_dir(self) -> None:
        """Remove the short socket directory once no server uses it (links in it are removed,
        never followed)."""
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None

    def _refuse_live_postmaster(self) -> None:
        pid = self._live_postmaster()
        if pid is not None:
            raise ServerControlError(
                f"a PostgreSQL server (pid {pid}) is already running on '{self.pgdata}'",
                hint="drkit starts servers only on data directories no server uses",
            )

    def _live_postmaster(self) -> int | None:
        """The pid in postmaster.pid when that process is a postmaster of this data directory."""
        try:
            first = (self.pgdata / "postmaster.pid").read_text(errors="replace").split("\n", 1)
            pid = int(first[0])
        except (OSError, ValueError):
            return None
        return pid if self._is_postmaster(pid) else None

    def _is_postmaster(self, pid: int) -> bool:
        # A postmaster changes into its data directory, so its cwd tells it apart from an
        # unrelated process that reused the pid; a zombie has no cwd and counts as gone.
        try:
            return os.readlink(f"/proc/{pid}/cwd") == str(self.pgdata.resolve())
        except PermissionError:
            return True  # someone else's live process: never ours to signal, never "gone"
        except OSError:
            return False

    def _postmaster_gone(self, pid: int) -> bool:
        """Whether ``pid`` has exited: no process, a zombie, or the pid reused by another process.
        A process in the middle of exiting (its cwd already released) is not gone yet."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"]):
            return True
        try:
            return os.readlink(f"/proc/{pid}/cwd") != str(self.pgdata.resolve())
        except OSError:
            return False

    def _recovery_state(self) -> Literal["unreachable", "recovering", "paused", "promoted"]:
        import psycopg

        try:
            with self.connect() as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if not row or not row[0]:
                    return "promoted"
                paused = conn.execute("SELECT pg_is_wal_replay_paused()").fetchone()
                return "paused" if paused and paused[0] else "recovering"
        except psycopg.Error:
            return "unreachable"  # not accepting connections yet, or recovery ending right now

    def _failure(self, message: str, hint: str | None = None) -> ServerControlError:
        return ServerControlError(
            f"{message}\n--- {self.log_file} (last lines) ---\n{self.log_tail()}",
            hint=hint,
            log_tail=self.log_tail(),
        )


def _make_short_socket_dir(owner: pwd.struct_passwd | None) -> Path:
    """A fresh private directory for a server's sockets, with a short path: a random name under
    /tmp made by mkdir (which fails on anything already there, a link included), checked to be
    the directory this process just made, then given to ``owner`` (the server user, when drkit
    runs as root). /tmp itself must be root's and sticky, so no one else can move it away."""
    parent = _SHORT_SOCKET_PARENT
    st = os.lstat(parent)
    sticky_or_private = bool(st.st_mode & stat.S_ISVTX) or not st.st_mode & 0o002
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or not sticky_or_private:
        raise ServerControlError(
            f"the server's socket path would exceed {SOCKET_PATH_MAX} bytes and '{parent}' is"
            " not a safe place for a shorter one (not a root-owned, sticky directory)",
            hint="use a shorter directory for the server (a drill's [drill] sandbox)",
        )
    path = Path(tempfile.mkdtemp(prefix="drkit-pg-", dir=parent))
    made = os.lstat(path)
    if not stat.S_ISDIR(made.st_mode) or made.st_uid != os.geteuid() or made.st_mode & 0o077:
        raise ServerControlError(f"refusing socket directory '{path}': not the one drkit made")
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    return path


def _render_setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _conninfo_quote(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- data comparison -----------------------------------------------------------------------------

_LIST_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND c.relpersistence = 'p'
  AND (c.relkind = 'r' OR c.relispopulated)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""


def table_checksums(cluster: Cluster, dbname: str) -> dict[str, str]:
    """``{"schema.table": "<rows>:<md5>"}`` for every user table and populated materialized view
    in ``dbname``. The md5 is over all rows' text forms, sorted byte-wise, so it depends only on
    content: two clusters with equal results hold the same rows. Unlogged tables are left out (a
    restore legitimately brings them back empty). Keys are quoted like ``format('%I.%I')``.
    Partitions are listed themselves, parents are not."""
    with cluster.connect(dbname) as conn:
        tables = [str(row[0]) for row in conn.execute(_LIST_TABLES)]
        if not tables:
            return {}
        selects = [
            f"SELECT {_sql_literal(t)}, count(*) || ':' || coalesce("  # noqa: S608 - names quoted by format('%I.%I')
            f"md5(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\")), md5('')) FROM {t} t"
            for t in tables
        ]
        rows = conn.execute("\nUNION ALL\n".join(selects).encode()).fetchall()
    return {str(name): str(value) for name, value in rows}


def database_checksums(cluster: Cluster) -> dict[str, dict[str, str]]:
    """``table_checksums`` for every database that accepts connections and is not a template."""
    sql = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
    with cluster.connect() as conn:
        databases = [str(row[0]) for row in conn.execute(sql)]
    return {db: table_checksums(cluster, db) for db in databases}


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
