"""`drkit heartbeat`: one row on the source, rewritten every few seconds, for an exact RPO.

A drill measures the RPO as the disaster instant minus the newest commit in the restored copy.
On a busy database the newest commit is seconds old; on an idle one it may be hours old, and the
measured RPO would say nothing about the WAL archive. The heartbeat commits a tiny transaction
every interval, so the restored copy's newest heartbeat row tells, to the interval, how much was
lost. The row is ``public.<table>(id int primary key, at timestamptz not null, host text)`` with
``id = 1``, in ``[heartbeat] database``; the table is created when missing.

It runs until SIGTERM or SIGINT and then exits 0 at once (the handler raises, so a sleep or a
query in progress is cut short). A failed beat — the server restarting, a network blip — is
logged and retried with a backoff capped at the interval: the heartbeat outlives the database's
restarts, which is exactly when an operator wants it still running.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql

from drkit.config.settings import Settings
from drkit.errors import ConfigError, PostgresError
from drkit.logs import event

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5  # seconds; libpq's smallest useful value is 2
FIRST_RETRY = 0.5  # seconds after the first failure; doubled after each further one


class _Stopped(BaseException):
    """Raised by the signal handler: a BaseException, so no error handling swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum).name


@dataclass
class HeartbeatResult:
    database: str
    table: str
    interval_seconds: float
    beats: int = 0  # rows upserted
    failures: int = 0  # beats that failed (logged, retried)
    last_at: datetime | None = None  # the server's time of the last beat
    stopped_by: str | None = None  # SIGTERM / SIGINT; None after --once

    @property
    def exit_code(self) -> int:
        return 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "table": self.table,
            "interval_seconds": self.interval_seconds,
            "beats": self.beats,
            "failures": self.failures,
            "last_at": self.last_at.isoformat() if self.last_at else None,
            "stopped_by": self.stopped_by,
            "exit_code": self.exit_code,
        }


class HeartbeatOperation:
    """Upserts the heartbeat row once (``once``) or every ``interval`` until a signal."""

    def __init__(
        self, settings: Settings, interval: timedelta | None = None, once: bool = False
    ) -> None:
        self.settings = settings
        self.interval = (interval or settings.heartbeat.interval).total_seconds()
        if self.interval <= 0:
            raise ConfigError("the heartbeat interval must be positive", hint="e.g. '10s'")
        self.once = once
        self.host = socket.gethostname()
        self.table = sql.Identifier("public", settings.heartbeat.table)

    def run(self) -> HeartbeatResult:
        hb = self.settings.heartbeat
        result = HeartbeatResult(hb.database, f"public.{hb.table}", self.interval)
        if self.once:
            with self._connect() as conn:
                result.last_at = self._beat(conn)
            result.beats = 1
            return result
        event(
            log,
            "heartbeat started",
            database=hb.database,
            table=result.table,
            interval_seconds=self.interval,
        )
        with _stopped_by_signals():
            try:
                self._beat_until_stopped(result)
            except _Stopped as stop:
                result.stopped_by = stop.signal
        return result

    def _beat_until_stopped(self, result: HeartbeatResult) -> None:
        conn: psycopg.Connection[Any] | None = None
        failing = 0  # failures since the last beat that worked
        try:
            while True:
                started = time.monotonic()
                try:
                    if conn is None:
                        conn = self._connect()
                    result.last_at = self._beat(conn)
                    result.beats += 1
                    if failing or result.beats == 1:
                        event(log, "heartbeat written", at=result.last_at.isoformat())
                    wait, failing = self.interval, 0
                except PostgresError as exc:
                    result.failures += 1
                    failing += 1
                    wait = min(FIRST_RETRY * 2 ** min(failing - 1, 16), self.interval)
                    event(
                        log,
                        "heartbeat failed",
                        level=logging.WARNING,
                        error=exc.message,
                        retry_seconds=round(wait, 3),
                    )
                    if conn is not None:
                        with suppress(psycopg.Error):
                            conn.close()
                        conn = None
                time.sleep(max(0.0, wait - (time.monotonic() - started)))
        finally:
            if conn is not None:
                with suppress(psycopg.Error):
                    conn.close()

    def _connect(self) -> psycopg.Connection[Any]:
        """A connection to ``[heartbeat] database`` with the table in place."""
        pg = self.settings.postgres
        try:
            conn = psycopg.connect(
                pg.conninfo(),
                dbname=self.settings.heartbeat.database,
                autocommit=True,
                application_name="drkit heartbeat",
                connect_timeout=CONNECT_TIMEOUT,
            )
        except psycopg.Error as exc:
            raise PostgresError(
                f"unable to connect to database '{self.settings.heartbeat.database}'"
                f" ({_first_line(exc)})",
                hint="check [postgres] and [heartbeat] database, and that the server is running",
            ) from None
        try:
            # A beat that takes longer than an interval has failed; it must not pile up.
            timeout_ms = max(1000, int(self.interval * 1000))
            conn.execute(sql.SQL("SET statement_timeout = {}").format(timeout_ms))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY,"
                    " at timestamptz NOT NULL, host text)"
                ).format(self.table)
            )
        except psycopg.Error as exc:
            conn.close()
            raise PostgresError(
                f"unable to create the heartbeat table {self._table_name()} ({_first_line(exc)})",
                hint="the [postgres] user needs CREATE on schema public of [heartbeat] database",
            ) from None
        return conn

    def _beat(self, conn: psycopg.Connection[Any]) -> datetime:
        """Upsert the row; returns the server's time written into it."""
        try:
            row = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, at, host) VALUES (1, now(), %s) ON CONFLICT (id)"
                    " DO UPDATE SET at = excluded.at, host = excluded.host RETURNING at"
                ).format(self.table),
                (self.host,),
            ).fetchone()
        except psycopg.Error as exc:
            raise PostgresError(
                f"unable to write the heartbeat into {self._table_name()} ({_first_line(exc)})"
            ) from None
        assert row is not None
        at: datetime = row[0]
        return at

    def _table_name(self) -> str:
        return f"'{self.settings.heartbeat.database}.public.{self.settings.heartbeat.table}'"


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Inside: SIGTERM and SIGINT raise ``_Stopped`` wherever the code is (sleeping, waiting
    for the server), so the heartbeat ends at once; the previous handlers come back after."""

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:  # a second signal while stopping must not interrupt the cleanup
            stopping = True
            raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
