"""A restore or a verify interrupted by Ctrl-C or SIGTERM stops at once (a worker waiting on the
network is not waited for), says so, and exits 130 or 143; a restore leaves its target as the
next restore accepts it: removed again, or after --delta without global/pg_control.

The repository is on S3 behind the fault proxy, whose first reply of a data object stalls: the
signal strikes while a worker waits for it and the others write."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rig.drkit import Drkit
from rig.faultproxy import PlannedFault, S3FaultProxy
from rig.servers import S3Server
from test_s3_faults import behind_proxy

STALL = 5.0  # seconds a stalled reply takes: the read timeout behind_proxy sets


@pytest.fixture
def dk(
    pg_factory: Any, workdir: Path, s3_server: S3Server, new_bucket: Callable[..., str]
) -> Iterator[tuple[Drkit, S3FaultProxy]]:
    """A backup of a small pgbench database in an S3 repository reached through a proxy."""
    bucket = new_bucket("drkit-interrupt")
    pg = pg_factory(15)
    pg.run_bin("pgbench", "-i", "-s", "2", "-q")
    with S3FaultProxy(s3_server.direct_endpoint_url) as proxy:
        drkit = Drkit(pg, workdir)
        behind_proxy(drkit, proxy, bucket)
        drkit.ok("init")
        drkit.ok("backup")
        yield drkit, proxy


def interrupt(dk: Drkit, stall: PlannedFault, signum: int, *args: str) -> str:
    """Run drkit ``args``, send ``signum`` once the stalled reply holds a worker; its stderr,
    after checking it stopped within a second or two, with the signal's exit code."""
    proc = dk.spawn(*args)
    try:
        deadline = time.monotonic() + 60
        while not stall.fired:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no data object was read"
            time.sleep(0.02)
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert seconds < STALL / 2, f"took {seconds:.1f}s to stop: {stderr}"
    assert "Traceback" not in stderr and "Aborted" not in stderr
    return stderr


def stall_one_read(proxy: S3FaultProxy) -> PlannedFault:
    return proxy.plan("slow", method="GET", match="/data/", times=1, delay=STALL * 2)


def test_ctrl_c_stops_a_restore_and_removes_what_it_wrote(
    dk: tuple[Drkit, S3FaultProxy], workdir: Path
) -> None:
    drkit, proxy = dk
    target = workdir / "restored"
    stderr = interrupt(
        drkit, stall_one_read(proxy), signal.SIGINT, "restore", "--pgdata", str(target)
    )
    assert (
        f"error: restore interrupted by SIGINT: what it had written to '{target}' was removed"
        in stderr
    )
    assert "HINT: run the restore again" in stderr
    assert not target.exists()  # it made the directory: it removed it
    result = drkit.ok("restore", "--pgdata", str(target))
    assert "every checksum verified" in result.stdout


def test_sigterm_stops_a_delta_restore_which_the_next_one_completes(
    dk: tuple[Drkit, S3FaultProxy], workdir: Path
) -> None:
    drkit, proxy = dk
    target = workdir / "restored"
    drkit.ok("restore", "--pgdata", str(target))
    largest = max(
        (p for p in (target / "base").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    largest.write_bytes(b"stale")  # the delta fetches it again
    stderr = interrupt(
        drkit, stall_one_read(proxy), signal.SIGTERM, "restore", "--delta", "--pgdata", str(target)
    )
    assert (
        f"error: restore interrupted by SIGTERM: '{target}' does not start until a restore"
        " completes (pg_control comes last)"
    ) in stderr
    assert "HINT: run the same restore --delta again" in stderr
    assert not (target / "global" / "pg_control").exists()
    result = drkit.ok("restore", "--delta", "--pgdata", str(target))
    assert "every checksum verified" in result.stdout
    assert (target / "global" / "pg_control").exists()


def test_sigterm_stops_a_verify(dk: tuple[Drkit, S3FaultProxy]) -> None:
    drkit, proxy = dk
    stderr = interrupt(drkit, stall_one_read(proxy), signal.SIGTERM, "verify")
    assert "error: verify interrupted by SIGTERM" in stderr
    assert "HINT: run 'drkit verify' again" in stderr
