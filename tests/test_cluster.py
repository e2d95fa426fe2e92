"""drkit's sandbox server (drkit.pg.cluster): binaries, start, promotion, stop, no leftovers."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from rig.postgres import PgCluster, PgFactory, chown_to_server_user

from drkit.errors import PostgresBinariesNotFound, ServerControlError
from drkit.pg.binaries import data_directory_major, find_bindir
from drkit.pg.cluster import Cluster


def sandbox(source: PgCluster, workdir: Path, **settings: object) -> Cluster:
    """drkit's own ``Cluster`` on a stopped rig clone's data directory, as a drill would make it."""
    return Cluster(
        pgdata=source.pgdata,
        bindir=find_bindir(data_directory_major(source.pgdata)),
        socket_dir=workdir / "sock",
        log_file=workdir / "log" / "server.log",
        settings={"archive_mode": "off", **settings},
    )


def postmaster_gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(
        f"/proc/{pid}/status"
    ).read_text(errors="replace")


def test_recovery_runs_to_promotion_and_stop_leaves_no_process(
    pg_factory: PgFactory, workdir: Path
) -> None:
    source = pg_factory(15, {"archive_mode": "on", "archive_command": "/bin/false"})
    source.psql("CREATE TABLE kept AS SELECT 1 AS a")
    source.stop()  # a shut-down primary, as a restore drill's copy would be after recovery
    (source.pgdata / "recovery.signal").touch()
    chown_to_server_user(source.pgdata / "recovery.signal")
    server = sandbox(source, workdir, restore_command="/bin/false")

    with server.running():
        server.wait_promoted(timeout=60)
        pid = int((source.pgdata / "postmaster.pid").read_text().split()[0])
        with server.connect() as conn:
            row = conn.execute(
                "SELECT pg_is_in_recovery(), current_setting('archive_mode'),"
                " current_setting('listen_addresses')"
            ).fetchone()
        assert row == (False, "off", "")  # promoted, not archiving, no TCP
        assert (source.pgdata / "pg_wal" / "00000002.history").is_file()  # a new timeline
        assert (workdir / "sock" / f".s.PGSQL.{server.port}").is_socket()
        assert "database system is ready to accept connections" in server.log_tail()
        # Run as the data directory's owner, never as root.
        uid_line = next(
            line
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert int(uid_line.split()[1]) == source.pgdata.stat().st_uid != 0

    assert not server.is_running()
    assert postmaster_gone(pid)
    assert not (source.pgdata / "postmaster.pid").exists()


def test_running_stops_the_server_when_the_body_fails(pg_factory: PgFactory, workdir: Path) -> None:
    server = sandbox(pg_factory(15, start=False), workdir)
    with pytest.raises(RuntimeError, match="drill check failed"), server.running():
        pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        raise RuntimeError("drill check failed")
    assert postmaster_gone(pid)


def test_a_hung_postmaster_is_killed(pg_factory: PgFactory, workdir: Path) -> None:
    server = sandbox(pg_factory(15, start=False), workdir)
    server.start()
    pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)  # neither a fast nor an immediate shutdown can finish now
    server.stop(timeout=1)
    assert postmaster_gone(pid)
    assert not server.is_running()


def test_start_failure_carries_the_server_log(pg_factory: PgFactory, workdir: Path) -> None:
    server = sandbox(pg_factory(15, start=False), workdir, shared_buffers="lots")
    with pytest.raises(ServerControlError) as caught:
        server.start(timeout=30)
    error = caught.value
    assert error.exit_code == 21
    assert f"PostgreSQL at '{server.pgdata}' did not start" in str(error)
    assert 'invalid value for parameter "shared_buffers": "lots"' in str(error)
    assert "shared_buffers" in error.log_tail
    assert not server.is_running()
    assert not (server.pgdata / "postmaster.pid").exists()


def test_a_data_directory_in_use_is_refused_and_left_running(pg: PgCluster, workdir: Path) -> None:
    intruder = sandbox(pg, workdir)
    with pytest.raises(ServerControlError, match="already running on") as caught:
        intruder.start()
    assert str(pg.pgdata) in str(caught.value)
    intruder.stop("immediate")  # it started nothing, so it stops nothing
    assert pg.psql("SELECT 1") == "1"


def test_missing_binaries_name_every_place_searched(pg: PgCluster) -> None:
    with pytest.raises(PostgresBinariesNotFound) as caught:
        find_bindir(9, configured=pg.bindir)
    message = str(caught.value)
    assert f"'{pg.bindir}' ([postgres] bindir): PostgreSQL {pg.version}" in message
    assert "'/usr/lib/postgresql/9/bin' (Debian package): no postgres, pg_ctl" in message
    assert "apt-get install postgresql-9" in (caught.value.hint or "")
    assert caught.value.exit_code == 20
    # The configured directory is searched first and wins when its version matches.
    assert find_bindir(pg.version, configured=pg.bindir) == pg.bindir
    assert data_directory_major(pg.pgdata) == pg.version


def test_a_socket_path_too_long_for_unix_sockets_gets_a_short_private_directory(
    pg_factory: PgFactory, workdir: Path
) -> None:
    source = pg_factory(15, start=False)
    deep = workdir / ("d" * 60) / ("e" * 60)  # the socket's path would be ~170 bytes
    assert len(str(deep / ".s.PGSQL.5432")) > 150
    server = Cluster(
        pgdata=source.pgdata,
        bindir=find_bindir(15),
        socket_dir=deep,
        log_file=workdir / "server.log",
    )
    assert server.host == deep

    with server.running():
        short = server.host
        assert short != deep and len(str(short / f".s.PGSQL.{server.port}")) <= 107
        st = os.lstat(short)
        assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077 == 0  # private, not a link
        assert st.st_uid == source.pgdata.stat().st_uid  # the server user's
        assert short.name.startswith("drkit-pg-") and len(short.name) > 12  # a random name
        assert (short / f".s.PGSQL.{server.port}").is_socket()
        with server.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

    assert not short.exists()  # removed with the server
    assert server.host == deep
