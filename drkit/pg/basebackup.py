"""A base backup over PostgreSQL's replication protocol (remote mode): BASE_BACKUP through libpq.

drkit speaks the protocol itself, through psycopg's libpq binding, rather than running
``pg_basebackup``: no client binary whose major must match the server's, no password or
connection string on a command line, and the archives arrive as a stream drkit reads directly
(``pg_basebackup`` writes only one tablespace to stdout). Since PostgreSQL 15 the server sends
every archive in one COPY stream of tagged messages ('n' a new archive, 'd' its bytes, 'p'
progress, 'm' the server's manifest); earlier majors send one COPY per archive in another format,
so remote mode needs 15 or later.

An incremental backup (17+, ``summarize_wal = on``) first uploads the prior backup's manifest on
the same connection (``UPLOAD_MANIFEST``, drkit/pg/incremental.py) and adds ``INCREMENTAL``; the
server then sends the relation files that changed in part as ``INCREMENTAL.<name>`` files.

The archives are tar streams, the tablespaces' first and PGDATA's (``base.tar``) last, which
also carries the WAL from the backup's start to its end (``WAL true``): the caller keeps that WAL
in pg_wal with a temporary replication slot for as long as the backup runs.
"""

from __future__ import annotations

import os
import select
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.pq.abc import PGconn, PGresult

from drkit.errors import PostgresError, RemoteTlsError, RemoteUnsupported, UnsafePassfile
from drkit.pg.wal import parse_lsn

# The first major whose BASE_BACKUP multiplexes every archive into one COPY stream.
REMOTE_MIN_VERSION = 150000
# The first major that takes incremental base backups (from its WAL summaries).
INCREMENTAL_MIN_VERSION = 170000
# SQLSTATE of the server refusing an incremental backup for want of what it needs (WAL
# summaries that cover the range, a prior backup on this server's timeline history)
_NOT_IN_PREREQUISITE_STATE = "55000"
UPLOAD_CHUNK = 1 << 20
# ERRCODE_DATA_CORRUPTED: what BASE_BACKUP ends with when pages failed their checksums
DATA_CORRUPTED = b"XX001"


class IncrementalRefused(PostgresError):
    """The server refused an incremental base backup before sending anything (its WAL summaries
    do not cover the range, the prior backup is not of its history): a full backup can be
    taken instead."""


@dataclass
class Archive:
    """One tar archive of the backup: PGDATA (``tablespace`` None) or a tablespace's directory."""

    name: str
    tablespace: int | None  # the tablespace's OID
    location: str  # the tablespace's directory on the server ('' for PGDATA)
    _stream: BaseBackupStream = field(repr=False)

    def readinto(self, buffer: memoryview, /) -> int:
        """Up to ``len(buffer)`` bytes of the archive (0 at its end)."""
        return self._stream.readinto_archive(buffer)


@dataclass
class BackupEnd:
    lsn: int
    timeline: int
    damaged_pages: bool = False  # the server found pages that failed their checksums


class BaseBackupStream:
    """One BASE_BACKUP on its own replication connection: ``start`` it, read its ``archives()``
    in order, each to its end, then ``end()``."""

    def __init__(self, conninfo: str) -> None:
        self._conn = connect_replication(conninfo)
        # bytes of the current archive not read yet: a view of the message as libpq received it
        self._pending = memoryview(b"")
        self._message: memoryview | None = None  # a message read past the current archive's end
        self._done = False
        self.start_lsn = 0
        self.timeline = 0
        # The server's warnings (a page that failed its checksum: its file and block)
        self.warnings: list[str] = []
        self._conn.notice_handler = self._notice

    def close(self) -> None:
        self._conn.finish()

    def __enter__(self) -> BaseBackupStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, label: str, fast: bool, prior_manifest: bytes | None = None) -> None:
        """Start the backup: a checkpoint (fast or spread), then the archives can be read. With
        ``prior_manifest`` (a backup manifest, drkit/pg/incremental.py) an incremental backup
        on top of that backup; IncrementalRefused when the server cannot take one."""
        incremental = ""
        if prior_manifest is not None:
            self._upload_manifest(prior_manifest)
            incremental = ", INCREMENTAL"
        checkpoint = "fast" if fast else "spread"
        # VERIFY_CHECKSUMS: the server re-reads a page torn by a concurrent write before it
        # sends it, which drkit, far from the file, cannot (drkit checks every page it receives
        # as well). A page that stays bad is sent as read, and the server says so at the end.
        command = (
            f"BASE_BACKUP (LABEL {_literal(label)}, CHECKPOINT '{checkpoint}', WAL true,"
            f" WAIT false, MANIFEST 'no', TABLESPACE_MAP false, VERIFY_CHECKSUMS true{incremental})"
        )
        self._conn.send_query(command.encode())
        start = self._result(pq.ExecStatus.TUPLES_OK, refusable=bool(incremental))
        self.start_lsn = parse_lsn(_value(start, 0, 0))
        self.timeline = int(_value(start, 0, 1))
        self._result(pq.ExecStatus.TUPLES_OK)  # the tablespaces; their archives say it again
        self._result(pq.ExecStatus.COPY_OUT)

    def _upload_manifest(self, manifest: bytes) -> None:
        self._conn.send_query(b"UPLOAD_MANIFEST")
        self._result(pq.ExecStatus.COPY_IN)
        chunks = (manifest[i : i + UPLOAD_CHUNK] for i in range(0, len(manifest), UPLOAD_CHUNK))
        for chunk in chunks:
            if self._conn.put_copy_data(chunk) != 1:
                break
        else:
            if self._conn.put_copy_end() == 1:
                self._result(pq.ExecStatus.COMMAND_OK)
                while self._conn.is_busy():  # the command's end: the connection is idle again
                    self._wait_readable()
                if self._conn.get_result() is None:
                    return
        raise PostgresError(f"uploading the prior backup's manifest failed: {self._error()}")

    def archives(self) -> Iterator[Archive]:
        """Each archive in the order the server sends it; read one to its end before the next."""
        while (message := self._next_message()) is not None:
            kind, body = message[:1], message[1:]
            if kind == b"n":
                name, location = (part.decode() for part in bytes(body).split(b"\0")[:2])
                oid = int(name.removesuffix(".tar")) if location else None
                yield Archive(name, oid, location, self)
            elif kind == b"d":
                raise PostgresError("the server sent archive data before naming its archive")
            # 'p' (progress) and 'm' (the server's manifest, not asked for) are passed over

    def readinto_archive(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the current archive, across as many messages as that takes
        (the server sends 32 kB at a time): fewer, larger reads for the caller. Short only at
        the archive's end."""
        filled, size = 0, len(buffer)
        while filled < size:
            if not self._pending:
                message = self._next_message()
                if message is not None and message[:1] == b"p":
                    continue  # progress, which may come between an archive's pieces
                if message is None or message[:1] != b"d":
                    self._message = message  # the next archive's (or the end): keep it
                    break
                self._pending = message[1:]
            n = min(size - filled, len(self._pending))
            buffer[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled

    def end(self) -> BackupEnd:
        """The backup's end LSN and timeline, once every archive was read. A server that found
        pages failing their checksums fails the command only after it sent everything, the end
        position included: that backup is whole (``damaged_pages``), as a local one is."""
        while self._next_message() is not None:
            pass
        row = self._result(pq.ExecStatus.TUPLES_OK)
        end = BackupEnd(parse_lsn(_value(row, 0, 0)), int(_value(row, 0, 1)))
        result = self._next_result()
        if (
            result is not None
            and result.status == pq.ExecStatus.FATAL_ERROR
            and result.error_field(pq.DiagnosticField.SQLSTATE) == DATA_CORRUPTED
        ):
            end.damaged_pages = True
        elif result is None or result.status != pq.ExecStatus.COMMAND_OK:
            raise self._failure(result)
        return end

    def _next_message(self) -> memoryview | None:
        if self._message is not None:
            message, self._message = self._message, None
            return message
        if self._done:
            return None
        # Asynchronously, waiting in select(): libpq's blocking read would hold the GIL, and
        # the workers compressing and encrypting what came before would stop while it waits.
        received = self._conn.get_copy_data(1)
        if received[0] == 0:
            # what the socket already holds first: while the pipeline is the slower side, the
            # server has always sent more, and waiting in select() would only cost a system call
            self._conn.consume_input()
            while (received := self._conn.get_copy_data(1))[0] == 0:
                self._wait_readable()
        n, data = received
        if n == -1:
            self._done = True
            return None
        if n < 0:
            self._done = True
            raise PostgresError(f"the base backup failed: {self._error()}")
        # not copied: the view keeps libpq's buffer of the message alive until it is read
        return memoryview(data)

    def _wait_readable(self) -> None:
        select.select([self._conn.socket], [], [])
        self._conn.consume_input()

    def _result(self, expected: pq.ExecStatus, refusable: bool = False) -> PGresult:
        """The next result, of status ``expected``; with ``refusable``, IncrementalRefused for
        the server's refusal of an incremental backup."""
        result = self._next_result()
        if result is None or result.status != expected:
            state = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            if refusable and result is not None and state == _NOT_IN_PREREQUISITE_STATE.encode():
                raise IncrementalRefused(_first_line(result.error_message.decode(errors="replace")))
            raise self._failure(result)
        return result

    def _next_result(self) -> PGresult | None:
        while self._conn.is_busy():  # a checkpoint may take minutes; wait without the GIL
            self._wait_readable()
        return self._conn.get_result()

    def _failure(self, result: PGresult | None) -> PostgresError:
        message = result.error_message.decode(errors="replace") if result else ""
        return PostgresError(
            f"the base backup failed: {_first_line(message) or self._error()}",
            hint=_hint(message),
        )

    def _notice(self, notice: PGresult) -> None:
        if notice.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED) == b"WARNING":
            message = notice.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
            self.warnings.append(message.decode(errors="replace"))

    def _error(self) -> str:
        result = self._conn.get_result()
        text = (result.error_message if result else b"") or self._conn.error_message
        return _first_line(text.decode(errors="replace")) or "the connection was lost"


def connect_replication(conninfo: str) -> PGconn:
    """A replication connection (``replication=database``) to the server; PostgresError (or
    RemoteTlsError for a certificate that is not trusted) naming what failed."""
    params = make_conninfo(conninfo, replication="database", application_name="drkit")
    conn = pq.PGconn.connect(params.encode())
    if conn.status != pq.ConnStatus.OK:
        message = _first_line(conn.error_message.decode(errors="replace"))
        conn.finish()
        raise connection_error(message, replication=True)
    return conn


def connection_error(message: str, replication: bool = False) -> PostgresError:
    """The error for a connection libpq refused, with what the operator can do about it."""
    if "client certificate" in message:
        return RemoteTlsError(
            f"TLS to PostgreSQL failed: {message}",
            hint="the server wants a client certificate: set postgres.sslcert and postgres.sslkey"
            " to the role's certificate (signed by a CA the server trusts) and its key",
        )
    if "certificate" in message or "SSL" in message or "ssl" in message:
        return RemoteTlsError(
            f"TLS to PostgreSQL failed: {message}",
            hint="postgres.sslrootcert must hold the CA that signed the server's certificate, and"
            " with sslmode = 'verify-full' the certificate must name postgres.host",
        )
    if replication and ("replication" in message or "pg_hba" in message):
        return PostgresError(
            f"unable to open a replication connection to PostgreSQL ({message})",
            hint="the role needs the REPLICATION attribute and pg_hba.conf a 'host replication'"
            " line for drkit's address (docs/remote.md)",
        )
    return PostgresError(
        f"unable to connect to PostgreSQL ({message})",
        hint="check [postgres] host/port/user or dsn, and that the server is running",
    )


def check_remote_version(version_num: int) -> None:
    if version_num < REMOTE_MIN_VERSION:
        raise RemoteUnsupported(
            f"remote backups need PostgreSQL 15 or later; the server runs {version_num // 10000}",
            hint="run drkit in local mode on the database host",
        )


def check_passfile(path: Path) -> None:
    """Refuse a password file others can read, or one that is not a regular file: libpq would
    silently ignore the first (and the backup fail for want of a password)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnsafePassfile(f"password file '{path}' cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise UnsafePassfile(
            f"password file '{path}' is readable by others (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=f"chmod 600 '{path}'",
        )


def _value(result: PGresult, row: int, column: int) -> str:
    value = result.get_value(row, column)
    if value is None:
        raise PostgresError("the server's BASE_BACKUP reply lacks a value drkit needs")
    return bytes(value).decode()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line.removeprefix("ERROR:").removeprefix("FATAL:").strip()


def _hint(message: str) -> str | None:
    if "checksum" in message:
        return "a page of the cluster is damaged: see the server log for the file and block"
    if "permission" in message or "must be superuser or replication" in message:
        return "the role needs the REPLICATION attribute (docs/remote.md)"
    return None
