"""A data directory read over SQL: remote diff/incr backups of PostgreSQL 15 and 16, and of 17+
without WAL summaries.

Those servers keep none, so their base backups cannot be incremental; drkit then
takes the backup as in local mode (pg_backup_start .. pg_backup_stop on the session it holds),
with the files listed by ``pg_ls_dir``/``pg_stat_file`` and read by
``pg_read_binary_file(path, offset, length, true)``, each reader thread on a connection of its
own. Paths are PGDATA-relative, as the server resolves them (tablespaces through pg_tblspc's
links), which is what lets a role read them with EXECUTE grants alone.

The listing applies the local walk's exclusions (drkit/pg/walk.py). The server's ``stat()``
follows symbolic links and gives whole-second times and no mode: a link inside PGDATA is listed
as what it points to, files get the modes the server's data_directory_mode gives new files.
"""

from __future__ import annotations

import io
import queue
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import psycopg

from drkit.config.settings import PostgresSettings
from drkit.errors import PostgresError
from drkit.pg.basebackup import connection_error
from drkit.pg.walk import EXCLUDE_CONTENTS, PgdataListing, SourceDir, SourceFile, excluded

# What a remote diff/incr read over SQL calls, besides a full's functions.
FILE_FUNCTIONS = (
    "pg_backup_start(text, boolean)",
    "pg_backup_stop(boolean)",
    "pg_ls_dir(text, boolean, boolean)",
    "pg_stat_file(text, boolean)",
    "pg_read_binary_file(text, bigint, bigint, boolean)",
)
FILES_MAX_VERSION = 169999  # from 17 on, only a server without WAL summaries needs them

# Every entry under PGDATA, recursively; the contents of directories a backup skips are not
# listed (pg_wal may hold thousands of segments).
_LIST_SQL = """
WITH RECURSIVE tree(path, isdir, size, mtime) AS (
    SELECT name, s.isdir, s.size, extract(epoch FROM s.modification)
    FROM pg_ls_dir('.', true, false) AS name, LATERAL pg_stat_file(name, true) AS s
  UNION ALL
    SELECT t.path || '/' || name, s.isdir, s.size, extract(epoch FROM s.modification)
    FROM tree AS t, LATERAL pg_ls_dir(t.path, true, false) AS name,
         LATERAL pg_stat_file(t.path || '/' || name, true) AS s
    WHERE t.isdir AND NOT t.path = ANY(%(skip)s) AND t.path !~ '(^|/)pgsql_tmp'
)
SELECT path, isdir, size, mtime FROM tree WHERE isdir IS NOT NULL
"""
_TABLESPACE = re.compile(r"^pg_tblspc/(\d+)(/([^/]+))?")
_UNLOGGED_INIT = re.compile(r"^(\d+)_init$")


def file_functions(version_num: int, incremental: bool) -> tuple[str, ...]:
    """The functions the role check requires of a remote backup besides a full's: a diff/incr
    before PostgreSQL 17 reads the data directory over SQL (from 17 on, only when the server
    keeps no WAL summaries: backup/remote.py checks them then, and falls back to a full)."""
    return FILE_FUNCTIONS if incremental and version_num <= FILES_MAX_VERSION else ()


class RemoteFiles:
    """Connections that read the server's data directory; one per concurrent reader, opened
    as needed, all closed by ``close``."""

    def __init__(self, settings: PostgresSettings) -> None:
        self._conninfo = settings.conninfo()
        self._idle: queue.SimpleQueue[psycopg.Connection[tuple[object, ...]]] = queue.SimpleQueue()
        self._all: list[psycopg.Connection[tuple[object, ...]]] = []

    def __enter__(self) -> RemoteFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._all:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, application_name="drkit")
                conn.execute("SET statement_timeout = 0")  # a large listing is not an error
            except psycopg.Error as exc:
                raise connection_error(str(exc).strip().splitlines()[0]) from None
            self._all.append(conn)
        try:
            yield conn
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PostgresError(f"reading the server's data directory failed: {reason}") from None
        self._idle.put(conn)

    def read(self, path: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``path`` from ``offset`` (fewer at its end); None: no such file."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT pg_read_binary_file(%s, %s, %s, true)", (path, offset, length), binary=True
            ).fetchone()
        return None if row is None or row[0] is None else bytes(cast(bytes, row[0]))

    def size(self, path: str) -> int | None:
        """The size of ``path`` now (None: no such file)."""
        with self._connection() as conn:
            row = conn.execute("SELECT size FROM pg_stat_file(%s, true)", (path,)).fetchone()
        return None if row is None or row[0] is None else int(str(row[0]))

    def names(self, directory: str) -> list[str]:
        """The entries of ``directory``."""
        with self._connection() as conn:
            rows = conn.execute("SELECT pg_ls_dir(%s, true, false)", (directory,)).fetchall()
        return sorted(str(name) for (name,) in rows)

    def open(self, path: str) -> RemoteFile:
        """``path`` opened for reading; FileNotFoundError when it is gone (dropped meanwhile)."""
        size = self.size(path)
        if size is None:
            raise FileNotFoundError(path)
        return RemoteFile(self, path, size)

    def listing(self, tablespace_version_dir: str) -> PgdataListing:
        """PGDATA's files and directories as the local walk lists them (pg/walk.py)."""
        with self._connection() as conn:
            shown = conn.execute("SHOW data_directory_mode").fetchone()
            rows = conn.execute(_LIST_SQL, {"skip": sorted(EXCLUDE_CONTENTS)}).fetchall()
        mode = int(str(shown[0] if shown else "700"), 8)
        unlogged: dict[str, set[str]] = {}  # per directory, the relations with an init fork
        for row in rows:
            rel, _, name = str(row[0]).rpartition("/")
            found = unlogged.setdefault(rel, set())
            if match := _UNLOGGED_INIT.match(name):
                found.add(match.group(1))
        listing = PgdataListing(files=[], dirs=[], links=[], tablespace_dirs={})
        for path, isdir, size, mtime in sorted(rows, key=lambda r: str(r[0])):
            rel, _, name = str(path).rpartition("/")
            if name in ("", ".", "..") or str(path).startswith("/"):
                raise PostgresError(
                    f"the server's data directory lists an unexpected path '{path}'"
                )
            if not _ours(str(path), tablespace_version_dir) or excluded(rel, name, unlogged[rel]):
                continue
            if isdir:
                listing.dirs.append(SourceDir(str(path), mode))
            else:
                stamp = float(str(mtime))
                listing.files.append(
                    SourceFile(str(path), Path(str(path)), int(str(size)), stamp, mode & 0o666)
                )
        return listing


def _ours(path: str, version_dir: str) -> bool:
    """Whether an entry belongs to the backup: under a tablespace, only this major version's
    directory (a location may hold another's beside it); a tablespace's link itself is not a
    directory of PGDATA. (The listing holds no contents of directories a backup skips.)"""
    match = _TABLESPACE.match(path)
    return match is None or match.group(3) == version_dir


class RemoteFile:
    """A file of the server's data directory, read in ranges: in order (``readinto``) or at
    given offsets (``pread_into``). It has no descriptor."""

    def __init__(self, files: RemoteFiles, path: str, size: int) -> None:
        self._files = files
        self.path = path
        self.size = size  # when opened
        self._offset = 0

    def readinto(self, buffer: memoryview, /) -> int:
        n = self.pread_into(buffer, self._offset)
        self._offset += n
        return n

    def pread_into(self, buffer: memoryview, offset: int, /) -> int:
        data = self._files.read(self.path, offset, len(buffer)) or b""  # gone: its end
        buffer[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a file read over SQL has no descriptor")

    def close(self) -> None:
        pass
