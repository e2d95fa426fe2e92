"""How to start a restored copy: the command printed for the operator at the end of a restore."""

from __future__ import annotations

import os
import pwd
import shlex
import threading
from collections.abc import Callable
from pathlib import Path

from drkit.errors import PostgresBinariesNotFound
from drkit.pg.binaries import find_bindir
from drkit.pg.cluster import free_port
from drkit.repo.manifest import Manifest
from drkit.restore.paths import ClusterUser


def start_command_in_background(
    manifest: Manifest, pgdata: Path, user: ClusterUser, bindir: Path | None
) -> Callable[[], str]:
    """The start command of ``pgdata``, found in a thread of its own while the restore runs (it
    asks the server binary its version, a process of its own: up to 0.1 s from a cold page
    cache). The call returned waits for it (or raises its error). A daemon thread: a restore
    that fails does not wait for it."""
    outcome: list[str | BaseException] = []

    def run() -> None:
        try:
            outcome.append(_start_command(manifest, pgdata, user, bindir))
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.append(exc)

    thread = threading.Thread(target=run, name="start-command", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    return result


def _start_command(manifest: Manifest, pgdata: Path, user: ClusterUser, bindir: Path | None) -> str:
    """How to start the restored cluster: a hint printed for the operator, so binaries that
    cannot be found leave a bare ``pg_ctl`` for them to adjust rather than fail the restore.
    The copy gets a port that is free now (the source's, from its postgresql.conf, is usually
    taken by the source itself on this host) and a log file outside PGDATA (a log inside it
    would be copied by the next backup of the copy, and fill its file system)."""
    try:
        binary = str(find_bindir(manifest.pg_major, bindir) / "pg_ctl")
    except PostgresBinariesNotFound:
        binary = "pg_ctl"
    log = shlex.quote(str(_log_directory(pgdata, user) / f"{pgdata.name}.log"))
    port = shlex.quote(f"-p {free_port()}")
    command = f"{binary} -D {shlex.quote(str(pgdata))} -l {log} -o {port} start"
    if os.geteuid() == 0:
        command = f"runuser -u {shlex.quote(user.name)} -- {command}"
    return command


def _log_directory(pgdata: Path, user: ClusterUser) -> Path:
    """Where the cluster's user can create the start command's log: beside PGDATA when that
    directory is theirs (or writable by whoever runs drkit, when not root), else their home."""
    parent = pgdata.parent
    try:
        if parent.stat().st_uid == user.uid:
            return parent
    except OSError:
        pass
    if os.geteuid() != 0 and os.access(parent, os.W_OK):
        return parent
    try:
        return Path(pwd.getpwuid(user.uid).pw_dir)
    except KeyError:
        return parent
