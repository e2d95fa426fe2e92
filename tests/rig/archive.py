"""Turn on WAL archiving into a drkit repository, the way an operator does: archive_command runs
``drkit wal-push`` as the server user (``postgres`` when the tests run as root).

That user must be able to run the venv's drkit (the venv lives at a path every user can
traverse), read the configuration, own the key file (mode 0600) and the repository, and own the
async spool. ``enable_archiving`` arranges all of it; call it after ``drkit init`` (which runs as
root and creates the repository).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rig.drkit import Drkit
from rig.postgres import PgCluster, chown_to_server_user, server_user

DRKIT_BIN = Path(sys.executable).parent / "drkit"


def drkit_command(dk: Drkit, command: str, *args: str) -> str:
    """A shell command line running this venv's drkit with ``dk``'s configuration."""
    parts = [str(DRKIT_BIN), command, "--config", str(dk.config), *args]
    return " ".join(shlex.quote(p) if not p.startswith("%") else p for p in parts)


def grant_to_server_user(dk: Drkit) -> None:
    """Hand the key file, the repository and the spool to the server user."""
    assert dk.keyfile is not None
    chown_to_server_user(dk.keyfile)
    dk.repo_path.mkdir(exist_ok=True)
    chown_to_server_user(dk.repo_path, recursive=True)
    spool = dk.workdir / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    chown_to_server_user(spool)


def enable_archiving(
    cluster: PgCluster,
    dk: Drkit,
    *,
    async_: bool = False,
    sections: dict[str, dict[str, Any]] | None = None,
    **archive: Any,
) -> None:
    """archive_mode = on, archive_command = drkit wal-push, ``[archive]`` in drkit.toml; restart.

    ``archive`` holds more ``[archive]`` settings (process_max, push_timeout...), ``sections``
    other sections for drkit.toml. The spool is ``<workdir>/spool``.
    """
    dk.write_config(
        archive={"async": async_, "spool_path": dk.workdir / "spool", **archive},
        **(sections or {}),
    )
    grant_to_server_user(dk)
    check = subprocess.run(
        ["runuser", "-u", server_user(), "--", str(DRKIT_BIN), "--version"]
        if server_user() == "postgres"
        else [str(DRKIT_BIN), "--version"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, f"the server user cannot run {DRKIT_BIN}: {check.stderr}"
    cluster.set_conf({"archive_mode": "on", "archive_command": drkit_command(dk, "wal-push", "%p")})
    cluster.restart()


def switch_wal(cluster: PgCluster) -> str:
    """Write a little, switch to a new segment; returns the name of the segment just finished."""
    return cluster.psql(
        "CREATE TABLE IF NOT EXISTS rig_switch (x int); INSERT INTO rig_switch VALUES (1);"
        " SELECT pg_walfile_name(pg_switch_wal());"
    ).splitlines()[-1]


def archiver_status(cluster: PgCluster) -> tuple[str, int, int]:
    """(last_archived_wal, archived_count, failed_count) from pg_stat_archiver."""
    row = cluster.psql(
        "SELECT coalesce(last_archived_wal, ''), archived_count, failed_count FROM pg_stat_archiver"
    )
    name, archived, failed = row.split("|")
    return name, int(archived), int(failed)


def wait_archived(cluster: PgCluster, name: str, timeout: float = 60) -> None:
    """Wait until PostgreSQL has archived ``name`` (its .ready became .done)."""
    status = cluster.pgdata / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (status / f"{name}.done").exists() or (
            not (status / f"{name}.ready").exists() and archiver_status(cluster)[0] >= name
        ):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{name} not archived after {timeout}s; pg_stat_archiver: {archiver_status(cluster)}\n"
        f"--- log ---\n{cluster.log_tail()}"
    )
