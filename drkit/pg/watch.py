"""Notice at once that the server closed an idle session, instead of at its next query.

A backup's session sits idle while the files are copied, which can take hours; PostgreSQL
stopping (or ending the session) meanwhile also ends the backup on the server's side, so every
byte copied after that is wasted. A watcher thread looks at the session's socket twice a second:
the server sends nothing to an idle session except when it ends it (a FATAL message, then end of
file) or a parameter change, which libpq buffers for the next query. When libpq reports the
connection gone, the watcher signals the main thread (SIGUSR1), whose handler raises
``SessionLost`` there, wherever the copy is waiting.
"""

from __future__ import annotations

import contextlib
import select
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psycopg
from psycopg.pq import ConnStatus

from drkit.errors import PostgresError


class SessionLost(PostgresError):
    """The server closed the session drkit was holding open (and the backup in it)."""


LOST_HINT = (
    "PostgreSQL stopped or ended drkit's session (its log says why); nothing of what was running"
    " is listed: run it again once the server is up"
)


@contextmanager
def watched(conn: psycopg.Connection[object], interval: float = 0.5) -> Iterator[None]:
    """While the block runs, ``conn`` must not be used: raise SessionLost in the main thread
    within ``interval`` seconds of the server closing it. Outside the main thread nothing is
    watched (only the main thread can take a signal handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = threading.Event()

    def _raise(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            raise SessionLost(
                "the connection to PostgreSQL was lost: the server closed drkit's session",
                hint=LOST_HINT,
            )

    previous = signal.signal(signal.SIGUSR1, _raise)
    main = threading.main_thread().ident
    assert main is not None
    thread = threading.Thread(
        target=_watch, args=(conn, interval, stop, main), name="pg-watch", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)


def _watch(
    conn: psycopg.Connection[object], interval: float, stop: threading.Event, main: int
) -> None:
    pgconn = conn.pgconn
    while not stop.wait(interval):
        readable, _, _ = select.select([pgconn.socket], [], [], 0)
        if not readable:
            continue
        # a parameter change stays buffered for the next query; the end of the session fails
        with contextlib.suppress(psycopg.OperationalError):
            pgconn.consume_input()
        if pgconn.status != ConnStatus.OK:
            signal.pthread_kill(main, signal.SIGUSR1)
            return
