"""drkit check against real PostgreSQL: a working archive_command, a secondary repository that
lags, a broken archive_command (check fails, init and backup warn); --nagios's line and codes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rig.archive import (
    DRKIT_BIN,
    archiver_status,
    enable_archiving,
    grant_to_server_user,
    switch_wal,
)
from rig.drkit import Drkit
from rig.postgres import PgCluster, chown_to_server_user

from drkit.errors import ArchiveCheckFailed, ArchivingFailing, WalNotCopied
from drkit.repo.wal_names import parse_wal_name


def test_check_archives_a_fresh_segment_into_the_repository(pg: PgCluster, workdir: Path) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)

    result = dk.ok("check", "--json")
    data = json.loads(result.stdout)
    segment = data["segment"]
    assert (dk.repo_path / parse_wal_name(segment).key).is_file()  # there, and it read back
    assert data["repositories"]["local"] is not None and data["warnings"] == []
    assert data["archiver"]["archived_count"] >= 1 and data["archiver"]["failed_count"] == 0

    text = dk.ok("check")
    assert "status: ok" in text.stdout and "archived to 'local' in" in text.stdout

    nagios = dk.run("check", "--nagios")
    assert nagios.exit_code == 0, nagios.output
    assert nagios.stdout.startswith("DRKIT OK - WAL segment ")
    assert len(nagios.stdout.splitlines()) == 1


def test_the_async_pusher_brings_the_segment_to_every_repository(
    pg: PgCluster, workdir: Path
) -> None:
    second = {"name": "second", "type": "posix", "path": workdir / "second"}
    dk = Drkit(pg, workdir, extra_repos=[second])
    dk.ok("init")
    chown_to_server_user(workdir / "second", recursive=True)
    enable_archiving(pg, dk, async_=True)  # the pusher copies WAL to 'second' when idle

    data = json.loads(dk.ok("check", "--json", "--timeout", "60").stdout)
    assert set(data["repositories"]) == {"local", "second"}
    assert all(seconds is not None for seconds in data["repositories"].values()), data
    key = parse_wal_name(data["segment"]).key
    assert (workdir / "second" / key).is_file()


def test_a_secondary_that_has_not_caught_up_is_a_warning(pg: PgCluster, workdir: Path) -> None:
    second = {"name": "second", "type": "posix", "path": workdir / "second"}
    dk = Drkit(pg, workdir, extra_repos=[second])
    dk.ok("init")
    enable_archiving(pg, dk)  # synchronous: WAL reaches 'second' only through replicate

    result = dk.run("check", "--timeout", "1")
    assert result.exit_code == WalNotCopied.exit_code == 110, result.output
    assert "is not in repository 'second' after 1s" in result.stderr
    assert "status: warning" in result.stdout

    nagios = dk.run("check", "--nagios", "--timeout", "1")
    assert nagios.exit_code == 1, nagios.output
    assert nagios.stdout.startswith("DRKIT WARNING - WAL segment ")
    assert "'second'" in nagios.stdout and len(nagios.stdout.splitlines()) == 1


def test_a_broken_archive_command_fails_the_check_and_warns_init_and_backup(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    dk.ok("init")
    enable_archiving(pg, dk)
    # A typo in the configuration's path: every wal-push exits 3.
    pg.set_conf({"archive_command": f"{DRKIT_BIN} wal-push --config {workdir}/drkit.tmol %p"})
    pg.reload()

    result = dk.run("check", "--timeout", "3")
    assert result.exit_code == ArchiveCheckFailed.exit_code, result.output
    assert "did not reach repository 'local' within 3s" in result.stderr
    assert "archive_command failed" in result.stderr
    assert "PostgreSQL's log says why" in result.stderr

    nagios = dk.run("check", "--nagios", "--timeout", "2")
    assert nagios.exit_code == 2, nagios.output
    assert nagios.stdout.startswith("DRKIT CRITICAL - WAL segment ")
    assert len(nagios.stdout.splitlines()) == 1

    init = dk.run("init")
    assert init.exit_code == ArchivingFailing.exit_code == 108, init.output
    assert "warning: WAL archiving is failing: archive_command failed" in init.stderr

    backup = dk.run("backup", "--json")
    assert backup.exit_code == 108, backup.output  # the backup itself is complete
    warnings = json.loads(backup.stdout)["warnings"]
    assert [w["warning"] for w in warnings] == ["ArchivingFailing"]
    assert "WAL archiving is failing" in warnings[0]["message"]

    # Archiving off is an error too, and --nagios says CRITICAL.
    pg.set_conf({"archive_command": ""})
    pg.reload()
    off = dk.run("check", "--nagios")
    assert off.exit_code == 2 and off.stdout.startswith("DRKIT CRITICAL - WAL archiving is off")


def test_init_after_archiving_was_turned_on_says_why_it_may_have_failed(
    pg: PgCluster, workdir: Path
) -> None:
    dk = Drkit(pg, workdir)
    enable_archiving(pg, dk)  # archive_command set before the repository exists
    failed = archiver_status(pg)[2]
    switch_wal(pg)
    deadline = time.monotonic() + 30
    while archiver_status(pg)[2] == failed:  # PostgreSQL tries at once, and fails
        assert time.monotonic() < deadline, "archive_command was never tried"
        time.sleep(0.1)

    init = dk.run("init")
    assert init.exit_code == ArchivingFailing.exit_code == 108, init.output
    assert "warning: WAL archiving is failing" in init.stderr
    assert "if it failed only because the repository did not exist yet" in init.stderr
    grant_to_server_user(dk)  # what init created, to the server user
    result = dk.ok("check")  # the next attempt archives, the backlog first
    assert "status: ok" in result.stdout
